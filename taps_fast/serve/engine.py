"""The engine: one model thread that turns queued requests for many tasks into mixed batches.

    engine = Engine(mt, pool, max_batch=32, max_wait_ms=5, max_tasks_per_batch=16)
    engine.start()
    fut = engine.submit("cars", x)          # x: [C, H, W], preprocessed; a concurrent Future
    fut.result()["top_k"]

Requests go into a bounded queue (``max_queue``; a full queue refuses at once with Overloaded,
HTTP 503 + Retry-After). The model thread forms a batch from the oldest requests whose task is
resident (or "base"), up to ``max_batch`` rows and ``max_tasks_per_batch`` distinct tasks,
waiting at most ``max_wait_ms`` after the oldest request arrived for the batch to fill, and runs
it as ONE MultiTaskModel forward: every row through its own task.

Tasks that are not resident are read and checked by a loader thread (``prepare_task``: the file
read, every check, the copy to the model's dtype; from the host cache when it holds the task)
while the model thread keeps serving resident tasks. The model thread alone changes the model:
between batches it evicts least-recently-used unpinned tasks until the new one fits the budget
(``add_prepared`` / ``remove_task`` cost time in proportion to that task's bytes: slot pools) and
then gives the waiting requests to the next batch. Since the thread that evicts is the thread
that runs the batches, no batch in flight ever loses a task.

Batch sizes can be padded up to a few buckets (``buckets``) with base rows, sliced off after the
forward: on a GPU each bucket is then one fixed shape (the mixed-batch kernels never sync the
host, so a bucket can be captured as a CUDA graph). On the CPU padding is wasted compute (the CPU
path runs task-pure chunks whose cost grows with the rows), so the default there is no padding.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..checkpoint import TaskFile, TaskFileError, TaskFileNotFoundError
from ..multitask import BASE, MultiTaskModel
from .errors import (Conflict, InsufficientBudget, Overloaded, ServeError, ShuttingDown, UnknownTask,
                     Unprocessable)
from .pool import MB, TaskPool
from .processing import top_k

log = logging.getLogger("taps_fast.serve")


def default_buckets(max_batch: int) -> List[int]:
    """Powers of two up to max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class Request:
    task: str
    x: Tensor
    k: int
    with_logits: bool
    future: Future
    t_enqueue: float = field(default_factory=time.perf_counter)


class _NullMetrics:
    """What the engine reports (metrics.py gives the prometheus-client version)."""

    def batch(self, rows: int, tasks: int, padded: int, seconds: float) -> None: ...
    def queue_depth(self, n: int) -> None: ...
    def cache(self, hit: bool) -> None: ...
    def load(self, source: str, seconds: float) -> None: ...
    def eviction(self) -> None: ...
    def resident(self, tasks: int, nbytes: int, allocated: int) -> None: ...


class Engine:
    """The model thread, the batcher and the loader (see the module docstring).

    ``model``: a MultiTaskModel in eval mode on the serving device (its tasks are managed here:
    start it empty, or with tasks already added, which are then resident and registered).
    ``pool``: the task registry and budget (TaskPool). ``buckets``: batch sizes to pad to (None:
    no padding). ``loaders``: threads that read and check task files.
    """

    def __init__(self, model: MultiTaskModel, pool: TaskPool, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_tasks_per_batch: int = 16, max_queue: int = 1024, buckets: Optional[Sequence[int]] = None,
                 loaders: int = 1, metrics=None) -> None:
        for what, v, lo in (("max_batch", max_batch, 1), ("max_tasks_per_batch", max_tasks_per_batch, 1),
                            ("max_queue", max_queue, 1), ("loaders", loaders, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"Engine: {what} must be an int >= {lo}, got {v!r}")
        if not (max_wait_ms >= 0):
            raise ValueError(f"Engine: max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if buckets is not None:
            buckets = sorted(set(int(b) for b in buckets))
            if not buckets or buckets[0] < 1 or buckets[-1] < max_batch:
                raise ValueError(f"Engine: buckets {buckets} must be positive and reach max_batch={max_batch}")
        self.model, self.pool = model, pool
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.max_tasks_per_batch, self.max_queue = max_tasks_per_batch, max_queue
        self.buckets = buckets
        self.metrics = metrics or _NullMetrics()
        p = next(iter(model.parameters()))
        self.device, self.dtype = p.device, p.dtype
        self._cond = threading.Condition()
        self._intake: Deque[Request] = deque()
        self._events: Deque[Callable[[], None]] = deque()  # run on the model thread between batches
        self._ready: Deque[Request] = deque()  # model thread only
        self._waiting: Dict[str, List[Request]] = {}  # model thread only: requests for loading tasks
        self._loading: set = set()  # model thread only
        self._loader = ThreadPoolExecutor(loaders, thread_name_prefix="taps-serve-loader")
        self._batches = itertools.count(1)
        self._accepting = False
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.batches_run = 0
        for name in model.tasks:  # tasks added before the engine: resident, unpinned
            e = pool.register(name, None)
            e.resident, e.nbytes, e.labels = True, model.task_bytes(name), model.task_labels(name)

    # -- life cycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="taps-serve-model", daemon=True)
            self._thread.start()
        return self

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; with ``drain`` answer every accepted one first (within
        ``timeout`` seconds; what is left then is answered with ShuttingDown)."""
        with self._cond:
            self._accepting = False
            if not drain:
                self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            deadline = time.monotonic() + timeout
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.05)
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join(5.0)
        self._loader.shutdown(wait=False, cancel_futures=True)
        err = ShuttingDown("the server is shutting down")
        leftover = list(self._intake) + list(self._ready) + [r for rs in self._waiting.values() for r in rs]
        for r in leftover:
            if not r.future.done():
                r.future.set_exception(err)

    @property
    def accepting(self) -> bool:
        """Whether new requests are taken (False once close() began)."""
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._intake) + len(self._ready) + sum(len(v) for v in self._waiting.values())

    # -- requests (any thread)
    def submit(self, task: str, x: Tensor, k: int = 5, with_logits: bool = False) -> Future:
        """Queue one sample ``x`` [C, H, W] for ``task`` (a task name or "base"): a Future of
        {"task", "top_k": [{"index", "prob"[, "label"]}], ["logits"], "queue_ms", "batch_ms",
        "batch_rows", "batch_tasks"}."""
        if task != BASE:
            self.pool.get(task)  # UnknownTask (404) at once
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise Unprocessable(f"top_k must be an integer >= 1, got {k!r}")
        fut: Future = Future()
        req = Request(task, x, k, with_logits, fut)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down: it accepts no new request")
            if self.queue_depth >= self.max_queue:
                raise Overloaded(f"the request queue is full ({self.max_queue} requests waiting); retry later")
            self._intake.append(req)
            self._cond.notify()
        return fut

    # -- tasks at run time (any thread)
    def add_task(self, name: str, path: str, pin: bool = False, load: bool = False) -> Future:
        """Register the task file ``path`` as ``name``: read and checked on a loader thread (a
        Future of the task's info, or of the error: Conflict for a taken name, another base or a
        pinned set over the budget, Unprocessable for a corrupt file); ``load`` or ``pin``: made
        resident at once."""
        if not isinstance(name, str) or not name or name == BASE or "/" in name:
            raise Unprocessable(f"the task name must be a non-empty string without '/', not {BASE!r}; got {name!r}")
        entry = self.pool.register(name, path, pinned=pin)  # Conflict if taken
        out: Future = Future()

        def prepare():
            try:
                prepared = self._prepare(name, path)
                entry.nbytes, entry.labels = prepared.nbytes, prepared.labels
                budget = self.pool.budget_bytes
                if budget is not None and prepared.nbytes > budget:
                    raise InsufficientBudget(f"task {name!r} needs {prepared.nbytes / MB:.2f} MB, more than the "
                                             f"whole task budget ({budget / MB:.2f} MB)")
                if pin and budget is not None and self.pool.pinned_bytes() > budget:
                    raise Conflict(f"pinning task {name!r} would pin {self.pool.pinned_bytes() / MB:.2f} MB, "
                                   f"more than the task budget ({budget / MB:.2f} MB)")
                self.pool.host.put(name, prepared, prepared.nbytes)
            except BaseException as e:
                self.pool.unregister(name)
                out.set_exception(e)
                return
            if pin or load:
                self._post(lambda: self._make_resident(name, prepared, out))
            else:
                out.set_result(entry.info())

        self._loader.submit(prepare)
        return out

    def remove_task(self, name: str) -> Future:
        """Forget task ``name``: new requests for it get UnknownTask at once; queued ones too,
        once the model thread drops it (between batches; the batch in flight completes)."""
        entry = self.pool.get(name)
        entry.removing = True
        out: Future = Future()

        def drop():
            try:
                if entry.resident:
                    self.model.remove_task(name)
                    entry.resident = False
                self.pool.unregister(name)
                self._fail_task(name, UnknownTask(f"task {name!r} was removed"))
                self._report_resident()
                out.set_result({"name": name, "removed": True})
            except BaseException as e:  # pragma: no cover - remove_task of a known task does not fail
                out.set_exception(e)

        self._post(drop)
        return out

    def tasks_info(self) -> Dict:
        stats = self.model.pool_stats()
        return {"tasks": [e.info() for e in self.pool.entries()],
                "budget_bytes": self.pool.budget_bytes, "resident_bytes": self.pool.resident_bytes(),
                "allocated_bytes": stats["bytes_allocated"], "host_cache_bytes": self.pool.host.nbytes,
                "model_bytes": self.model.weight_bytes()}

    # -- the loader thread(s)
    def _prepare(self, name: str, path: Optional[str]):
        """The task read and checked (host cache first): MultiTaskModel.prepare_task's result."""
        cached = self.pool.host.get(name)
        if cached is not None:
            return cached
        if path is None:
            raise UnknownTask(f"task {name!r} has no task file to load it from")
        try:
            tf = TaskFile(path)
        except TaskFileNotFoundError as e:
            raise Unprocessable(str(e)) from None
        except TaskFileError as e:
            raise Unprocessable(f"task {name!r}: {e}") from None
        fp = str(tf.meta.get("base_fingerprint"))
        if fp != self.model.fingerprint:
            raise Conflict(f"task file {path!r} was made for another base model (base fingerprint {fp[:16]}…, "
                           f"this server's {self.model.fingerprint[:16]}…)")
        try:
            return self.model.prepare_task(name, path)
        except (TaskFileError, ValueError) as e:
            raise Unprocessable(f"task {name!r}: {e}") from None

    # -- the model thread
    def _post(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._events.append(fn)
            self._cond.notify()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._intake or self._events or self._ready or self._stop
                           or (not self._accepting and not self._waiting)):
                    self._cond.wait()
                if self._stop or (not self._accepting and not (self._intake or self._events or self._ready
                                                                or self._waiting)):
                    return
                events = list(self._events)
                self._events.clear()
            for fn in events:
                self._safe(fn)
            self._take_intake()
            if self._ready:
                self._run_batch(self._form_batch())
            elif self._waiting and not self._intake and not self._events:
                with self._cond:  # only loads are pending: sleep until one completes
                    if not (self._intake or self._events or self._stop):
                        self._cond.wait(0.05)

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # an event must never stop the model thread
            log.exception("an event on the model thread failed")

    def _take_intake(self) -> None:
        with self._cond:
            new = list(self._intake)
            self._intake.clear()
        for r in new:
            self._classify(r)
        self.metrics.queue_depth(self.queue_depth)

    def _classify(self, r: Request) -> None:
        if r.task == BASE:
            self._ready.append(r)
            return
        if not self.pool.has(r.task):
            r.future.set_exception(UnknownTask(f"unknown task {r.task!r} (removed)"))
            return
        entry = self.pool.lookup(r.task)
        if entry.resident:
            self.metrics.cache(True)
            self._ready.append(r)
            return
        self.metrics.cache(False)
        self._waiting.setdefault(r.task, []).append(r)
        if r.task not in self._loading:
            self._start_load(r.task, entry.path)

    def _start_load(self, name: str, path: Optional[str]) -> None:
        """Read and check task ``name`` on a loader thread; the model thread commits it."""
        self._loading.add(name)
        t0 = time.perf_counter()
        source = "host" if self.pool.host.get(name) is not None else "disk"

        def load():
            try:
                prepared = self._prepare(name, path)
            except BaseException as e:
                self._post(lambda err=e: self._load_failed(name, err))
                return
            self._post(lambda: self._loaded(name, prepared, source, t0))

        self._loader.submit(load)

    def _load_failed(self, name: str, err: BaseException) -> None:
        self._loading.discard(name)
        if self.pool.has(name):
            self.pool.lookup(name).error = str(err)
        self._fail_task(name, err if isinstance(err, ServeError) else
                        ServeError(f"task {name!r} could not be loaded: {err}"))

    def _loaded(self, name: str, prepared, source: str, t0: float) -> None:
        self._loading.discard(name)
        if not self.pool.has(name):  # removed while it loaded
            self._fail_task(name, UnknownTask(f"task {name!r} was removed"))
            return
        try:
            self._make_resident(name, prepared)
        except ServeError as e:
            self._fail_task(name, e)
            return
        self.pool.host.put(name, prepared, prepared.nbytes)
        self.metrics.load(source, time.perf_counter() - t0)
        waiting = self._waiting.pop(name, [])
        self._ready.extendleft(reversed(waiting))  # they waited longest: first in the next batch

    def _make_resident(self, name: str, prepared, out: Optional[Future] = None) -> None:
        """Evict until ``prepared`` fits the budget, then add it to the model (model thread)."""
        try:
            entry = self.pool.get(name)  # UnknownTask if removed meanwhile
            if not entry.resident:
                busy = {r.task for r in self._ready}
                victims = self.pool.victims(prepared.nbytes, busy)
                if victims is None:
                    raise Overloaded(f"task {name!r} ({prepared.nbytes / MB:.2f} MB) does not fit the task budget "
                                     f"({self.pool.budget_bytes / MB:.2f} MB) beside the pinned tasks", 5)
                for v in victims:
                    self._evict(v)
                self.model.add_prepared(prepared)
                entry.resident, entry.nbytes, entry.labels, entry.error = True, prepared.nbytes, prepared.labels, None
                entry.loads += 1
                entry.last_used = next(self._batches)
                self._report_resident()
        except BaseException as e:
            if out is not None:
                out.set_exception(e)
                return
            raise
        if out is not None:
            out.set_result(entry.info())

    def _evict(self, name: str) -> None:
        entry = self.pool.lookup(name)
        self.model.remove_task(name)
        entry.resident = False
        self.metrics.eviction()
        keep: Deque[Request] = deque()
        for r in self._ready:  # queued requests for it wait for its reload
            if r.task == name:
                self._waiting.setdefault(name, []).append(r)
            else:
                keep.append(r)
        self._ready = keep
        if name in self._waiting:
            self._start_load(name, entry.path)

    def _fail_task(self, name: str, err: BaseException) -> None:
        for r in self._waiting.pop(name, []):
            r.future.set_exception(err)
        keep: Deque[Request] = deque()
        for r in self._ready:
            if r.task == name:
                r.future.set_exception(err)
            else:
                keep.append(r)
        self._ready = keep

    def _report_resident(self) -> None:
        stats = self.model.pool_stats()
        self.metrics.resident(stats["tasks"], stats["bytes_used"], stats["bytes_allocated"])

    def _selectable(self) -> int:
        """How many ready requests the next batch can take (max_batch, max_tasks_per_batch)."""
        tasks, n = set(), 0
        for r in self._ready:
            if r.task in tasks or len(tasks) < self.max_tasks_per_batch:
                tasks.add(r.task)
                n += 1
                if n >= self.max_batch:
                    break
        return n

    def _form_batch(self) -> List[Request]:
        """The oldest ready requests, up to max_batch rows and max_tasks_per_batch tasks, after
        waiting up to max_wait_ms (from the oldest's arrival) for the batch to fill."""
        deadline = self._ready[0].t_enqueue + self.max_wait_s
        while self._selectable() < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            with self._cond:
                if not self._intake and not self._stop and self._accepting:
                    self._cond.wait(left)
                stop = self._stop or not self._accepting  # draining: no more waiting to fill
            self._take_intake()
            if stop:
                break
            if not self._ready:
                return []
        batch, keep, tasks = [], deque(), set()
        for r in self._ready:
            if len(batch) < self.max_batch and (r.task in tasks or len(tasks) < self.max_tasks_per_batch):
                tasks.add(r.task)
                batch.append(r)
            else:
                keep.append(r)
        self._ready = keep
        return batch

    def _run_batch(self, batch: List[Request]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        n = len(batch)
        size = n if self.buckets is None else next(b for b in self.buckets if b >= n)
        names = [r.task for r in batch] + [BASE] * (size - n)
        try:
            x = torch.stack([r.x for r in batch])
            if size > n:
                x = torch.cat([x, x.new_zeros((size - n,) + tuple(x.shape[1:]))])
            x = x.to(self.device, self.dtype, non_blocking=True)
            with torch.inference_mode():
                logits = self.model(x, names)[:n]
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                raise ServeError("the model's output is not [batch, classes] logits: the server serves classifiers")
            sizes = [self.model.num_outputs(t) for t in names[:n]]
            labels = [None if t == BASE else self.pool.lookup(t).labels for t in names[:n]]
            rows = top_k(logits.cpu(), sizes, [r.k for r in batch], labels, [r.with_logits for r in batch])
        except BaseException as e:
            log.exception("a batch of %d rows failed", n)
            err = e if isinstance(e, ServeError) else ServeError(f"the batch failed: {type(e).__name__}: {e}")
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        t1 = time.perf_counter()
        stamp = next(self._batches)
        distinct = {r.task for r in batch}
        for t in distinct - {BASE}:
            self.pool.lookup(t).last_used = stamp
        self.batches_run += 1
        self.metrics.batch(n, len(distinct), size, t1 - t0)
        for r, row in zip(batch, rows):
            row.update(task=r.task, queue_ms=(t0 - r.t_enqueue) * 1e3, batch_ms=(t1 - t0) * 1e3,
                       batch_rows=n, batch_tasks=len(distinct))
            r.future.set_result(row)
