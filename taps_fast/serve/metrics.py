"""The server's Prometheus metrics (prometheus-client), one registry per server.

Requests and latency per task and status, batch rows and distinct tasks per batch, the padded
rows, queue depth, residency hits and misses, loads (from the host cache or disk) and their
time, evictions, and the bytes of task weights resident and allocated on the serving device.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency buckets (seconds): a CPU forward of a small model is 10-500 ms.
LATENCY_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("taps_serve_requests", "Predict requests answered, by task and HTTP status",
                                ["task", "status"], registry=r)
        self.latency = Histogram("taps_serve_request_seconds", "Predict request latency, receipt to answer",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("taps_serve_batch_rows", "Requests per batch", buckets=ROW_BUCKETS, registry=r)
        self.batch_tasks = Histogram("taps_serve_batch_tasks", "Distinct tasks (base included) per batch",
                                     buckets=ROW_BUCKETS, registry=r)
        self.batch_padded = Counter("taps_serve_padded_rows", "Base rows added to fill a batch bucket", registry=r)
        self.batch_seconds = Histogram("taps_serve_batch_seconds", "Model time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("taps_serve_queue_depth", "Requests queued or waiting for their task to load",
                           registry=r)
        self.hits = Counter("taps_serve_cache_hits", "Requests whose task was resident", registry=r)
        self.misses = Counter("taps_serve_cache_misses", "Requests whose task had to be loaded", registry=r)
        self.loads = Counter("taps_serve_loads", "Tasks made resident, by where they came from",
                             ["source"], registry=r)
        self.load_seconds = Histogram("taps_serve_load_seconds", "Time to make a task resident",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("taps_serve_evictions", "Tasks evicted to fit the task budget", registry=r)
        self.resident_tasks = Gauge("taps_serve_resident_tasks", "Tasks resident on the serving device", registry=r)
        self.resident_bytes = Gauge("taps_serve_resident_bytes", "Bytes of the resident tasks' weights", registry=r)
        self.allocated_bytes = Gauge("taps_serve_allocated_bytes",
                                     "Bytes of the task pools on the serving device, free slots included", registry=r)

    # -- the engine's reports
    def batch(self, rows: int, tasks: int, padded: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_tasks.observe(tasks)
        if padded > rows:
            self.batch_padded.inc(padded - rows)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, n: int) -> None:
        self.queue.set(n)

    def cache(self, hit: bool) -> None:
        (self.hits if hit else self.misses).inc()

    def load(self, source: str, seconds: float) -> None:
        self.loads.labels(source).inc()
        self.load_seconds.observe(seconds)

    def eviction(self) -> None:
        self.evictions.inc()

    def resident(self, tasks: int, nbytes: int, allocated: int) -> None:
        self.resident_tasks.set(tasks)
        self.resident_bytes.set(nbytes)
        self.allocated_bytes.set(allocated)

    # -- the front end's
    def request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        if status == 200:
            self.latency.labels(task).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
