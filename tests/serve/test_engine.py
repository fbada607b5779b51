"""The engine, pool and processing in-process: batching limits, the bounded queue, LRU victims,
top-k, decoding errors."""
import time

import pytest
import torch

from taps_fast import MultiTaskModel
from taps_fast.serve.engine import Engine, default_buckets
from taps_fast.serve.errors import BadRequest, Overloaded, UnknownTask, Unprocessable
from taps_fast.serve.pool import TaskPool
from taps_fast.serve.processing import Preprocessor, top_k

from serve_helpers import SIZE, Oracle, make_base, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("engine"), n_tasks=5)


def engine_for(world, **kw):
    mt = MultiTaskModel(make_base()).eval()
    eng = Engine(mt, TaskPool(kw.pop("budget", None), 0), **kw).start()
    for n in world["names"]:
        eng.add_task(n, world["paths"][n]).result(60)
    return eng


def test_batches_respect_max_batch_and_tasks(world):
    oracle = Oracle(world)
    eng = engine_for(world, max_batch=6, max_tasks_per_batch=2, max_wait_ms=300)
    try:
        x = torch.randn(3, SIZE, SIZE)
        names = world["names"] + ["base"]
        futs = [(names[i % len(names)], eng.submit(names[i % len(names)], x, 2, True)) for i in range(30)]
        for task, f in futs:
            r = f.result(60)
            assert r["batch_rows"] <= 6 and r["batch_tasks"] <= 2, r
            want = oracle.model(task)(x[None].double())[0]
            got = torch.tensor(r["logits"], dtype=torch.float64)
            assert (got - want).abs().max() / want.abs().max() < 1e-4
        assert max(f.result()["batch_rows"] for _, f in futs) > 1
    finally:
        eng.close()


def test_queue_full_is_refused_at_once(world):
    eng = engine_for(world, max_batch=64, max_queue=3, max_wait_ms=2000)
    try:
        x = torch.randn(3, SIZE, SIZE)
        futs = [eng.submit("task0", x) for _ in range(3)]
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as e:
            eng.submit("task1", x)
        assert time.perf_counter() - t0 < 0.5 and e.value.headers["Retry-After"]
        with pytest.raises(UnknownTask):
            eng.submit("nope", x)
        with pytest.raises(Unprocessable):
            eng.submit("task0", x, k=0)
    finally:
        eng.close(drain=True)
    assert all(f.result(1)["task"] == "task0" for f in futs)  # drained, not dropped


def test_budget_evicts_lru_never_pinned(world):
    mt = MultiTaskModel(make_base())
    nb = mt.prepare_task("task0", world["paths"]["task0"]).nbytes
    pool = TaskPool(int(nb * 2.5), 0)
    eng = Engine(mt.eval(), pool, max_wait_ms=0).start()
    try:
        eng.add_task("task0", world["paths"]["task0"], pin=True).result(60)
        for n in world["names"][1:]:
            eng.add_task(n, world["paths"][n]).result(60)
        x = torch.randn(3, SIZE, SIZE)
        for n in world["names"][1:] * 2:
            eng.submit(n, x).result(60)
            assert pool.resident_bytes() <= pool.budget_bytes
            assert pool.lookup("task0").resident
        assert 1 <= len(mt.tasks) < len(world["names"])  # evicted, task0 kept
    finally:
        eng.close()


def test_victims_order():
    from taps_fast.serve.pool import TaskEntry

    pool = TaskPool(100, 0)
    for name, used, pinned in (("a", 3, False), ("b", 1, False), ("c", 2, True), ("d", 0, False)):
        e = pool.register(name, None, pinned=pinned)
        e.resident, e.nbytes, e.last_used = True, 25, used
    assert isinstance(pool.lookup("a"), TaskEntry)
    assert pool.victims(10, busy=set()) == ["d"]
    assert pool.victims(30, busy={"d"}) == ["b", "a"]
    assert pool.victims(80, busy=set()) is None  # c is pinned


def test_top_k_and_labels():
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [0.0, 0.0, 5.0, 1.0]])
    rows = top_k(logits, [3, 4], [5, 1], [["a", "b", "c"], None], [True, False])
    assert [p["index"] for p in rows[0]["top_k"]] == [1, 2, 0]
    assert [p["label"] for p in rows[0]["top_k"]] == ["b", "c", "a"]
    assert rows[0]["logits"] == [1.0, 3.0, 2.0] and "logits" not in rows[1]
    assert rows[1]["top_k"][0]["index"] == 2 and "label" not in rows[1]["top_k"][0]
    assert abs(sum(p["prob"] for p in rows[0]["top_k"]) - 1) < 1e-6


def test_preprocessor_errors():
    pre = Preprocessor(make_base())
    with pytest.raises(BadRequest, match="no image"):
        pre(b"")
    with pytest.raises(BadRequest, match="not an image"):
        pre(b"GIF89a garbage")


def test_engine_argument_checks(world):
    mt = MultiTaskModel(make_base())
    for kw in ({"max_batch": 0}, {"max_tasks_per_batch": 0}, {"max_queue": 0}, {"max_wait_ms": -1},
               {"buckets": [1, 2]}):
        with pytest.raises(ValueError):
            Engine(mt, TaskPool(None, 0), max_batch=kw.pop("max_batch", 4), **kw)
    assert default_buckets(24) == [1, 2, 4, 8, 16, 24]
