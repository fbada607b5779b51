"""MultiTaskModel as a server uses it: several threads at once, any integer id dtype, batches with
no tasks, and random add/remove sequences checked against each task's own model.

Hypothesis draws the sequences (``TAPS_FUZZ_EXAMPLES`` raises the number of examples, as in
test_fuzz_ops.py); the oracle is always the task's own converted model in float64.
"""
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taps_fast import MultiTaskModel
from taps_fast.ops import taps_mt_conv2d, taps_mt_linear

from helpers import RTOL_MODEL, assert_rel_close
from test_multitask import PATHS, build, check_rows, make_plain, make_task, oracle_rows

EXAMPLES = int(os.environ.get("TAPS_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- threads
@PATHS
@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_concurrent_calls_give_the_serial_results(arch, cpu_chunk):
    """8 threads, each calling one model with its own random task mixes, get exactly the results
    of the same calls made one after another (the call's ids and task live in the calling
    thread, not in the model)."""
    mt, _, _ = build(arch, T=4, cpu_chunk=cpu_chunk)
    mt.eval()
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(8 * 3):
        b = int(torch.randint(1, 7, (1,), generator=g))
        calls.append((torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64),
                      torch.randint(-1, 4, (b,), generator=g)))
    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # 8 callers on 2 cores: intra-op threads on top only contend (and
    try:                      # the serial results must be summed the same way as the threads')
        with torch.no_grad():
            serial = [mt(x, ids) for x, ids in calls]
    finally:
        torch.set_num_threads(intra)
    results, errors = [None] * len(calls), []
    start = threading.Barrier(8)

    def worker(w):
        try:
            start.wait()
            with torch.no_grad():
                for i in range(w, len(calls), 8):
                    for _ in range(2):  # repeat, so that calls overlap in every phase
                        results[i] = mt(*calls[i])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        torch.set_num_threads(intra)
    assert not errors, errors[0]
    for i, (a, b) in enumerate(zip(results, serial)):
        assert torch.equal(a, b), f"call {i}: a concurrent call returned another result than alone"


# ----------------------------------------------------------------------------- ids
@pytest.fixture(scope="module", params=["test_resnet", "test_vit"])
def small(request):
    """float32: the dtype the compiled few-row kernel serves (it refused narrow ids); test_vit
    for its gated linear layers."""
    mt, tasks, base_oracle = build(request.param, T=3)
    return mt.float().eval(), tasks, base_oracle


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("cpu_chunk", [8, 0], ids=["chunks", "mixed"])
@pytest.mark.parametrize("batch", [0, 5, 40])
def test_every_integer_id_dtype_serves(small, dtype, cpu_chunk, batch):
    """int8/int16/uint8 ids serve like int64 ones, on every path (the compiled few-row kernel
    takes int32/int64 only: the model widens the ids first). uint8 cannot say -1 (the base)."""
    mt, tasks, base_oracle = small
    if batch == 0 and mt.base.__class__.__name__ == "VisionTransformer":
        pytest.skip("timm's ViT itself cannot run an empty batch (its attention reshape)")
    g = torch.Generator().manual_seed(batch)
    lo = 0 if dtype == torch.uint8 else -1
    ids = torch.randint(lo, 3, (batch,), generator=g)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    mt.cpu_chunk = cpu_chunk
    try:
        with torch.no_grad():
            got, want = mt(x, ids.to(dtype)), mt(x, ids)
    finally:
        mt.cpu_chunk = 8
    assert got.shape == want.shape and got.shape[0] == batch and torch.equal(got, want)


def test_ids_that_are_not_integers_are_refused(small):
    mt = small[0]
    x = torch.randn(3, 3, 32, 32)
    for bad in ([0.7, 1, 0], [0, True, 1], [0, None, 1]):
        with pytest.raises(TypeError, match="task ids must be task names or integers"):
            mt(x, bad)
    for dtype in (torch.float32, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="integer tensor, got dtype"):
            mt(x, torch.zeros(3, dtype=dtype))
    import numpy as np
    assert torch.equal(mt(x, [np.int64(0), 1, -1]), mt(x, torch.tensor([0, 1, -1])))


# ----------------------------------------------------------------------------- no tasks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cpu_chunk", [8, 0], ids=["chunks", "mixed"])
def test_a_model_without_tasks_runs_the_base(cpu_chunk, dtype):
    """A fresh MultiTaskModel, and one whose tasks were all removed, serve an all-base batch as
    the base model does (no IndexError from an empty task table)."""
    mt, tasks, base_oracle = build("test_resnet", T=2, cpu_chunk=cpu_chunk)
    fresh = MultiTaskModel(make_plain("test_resnet").to(dtype), cpu_chunk=cpu_chunk).eval()
    mt.remove_task("t0")
    mt.remove_task("t1")
    mt.to(dtype).eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = base_oracle.eval()(x)
        x = x.to(dtype)
        for m in (fresh, mt):
            for ids in (torch.full((4,), -1), ["base"] * 4, torch.full((4,), -1, dtype=torch.int8)):
                assert_rel_close(m(x, ids), want, dtype, "all-base batch", bounds=RTOL_MODEL)
            assert m(x[:0], torch.zeros(0, dtype=torch.int64)).shape == (0, 5)
            with pytest.raises(ValueError, match="task id 0 is out of range"):
                m(x, torch.tensor([0, -1, -1, -1]))


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_mixed_ops_with_no_tasks(op):
    """taps_mt_* with T = 0 (slot, scores, thresholds of shape [0]): every row is the base."""
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) if op == "conv2d" else torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    deltas = w.new_zeros((0,) + tuple(w.shape))
    slot, scores, thr = torch.zeros(0, dtype=torch.int64), w.new_zeros(0), w.new_zeros(0)
    ids = torch.full((3,), -1)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            if op == "linear":
                y, want = taps_mt_linear(x, ids, w, deltas, slot, scores, thr, b), torch.nn.functional.linear(x, w, b)
            else:
                y, want = taps_mt_conv2d(x, ids, w, deltas, slot, scores, thr, b, 1, 1), torch.nn.functional.conv2d(x, w, b, 1, 1)
        assert_rel_close(y, want, torch.float64, op)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    assert_rel_close(g, g_want, torch.float64, op + " dx")


# ----------------------------------------------------------------------------- sequences
@FUZZ
@given(data=st.data())
def test_random_add_remove_sequences_match_each_tasks_own_model(data):
    """Random sequences (add a task from a model or a file, remove one, serve a batch with any id
    dtype, empty or all-base batches) against each task's own model, on both CPU paths."""
    plain = _plain()
    cpu_chunk = data.draw(st.sampled_from([3, 0]), label="cpu_chunk")
    mt = MultiTaskModel(_copy(plain), cpu_chunk=cpu_chunk).eval()
    own = {}  # name -> the task's own model
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        action = data.draw(st.sampled_from(["add", "add", "remove", "serve", "serve"]), label=f"action{step}")
        if action == "add":
            seed = data.draw(st.integers(1, 40), label="seed")
            name = f"task{seed}"
            if name in own:
                continue
            model = _task(plain, seed)
            mt.add_task(name, model)
            own[name] = model
        elif action == "remove" and own:
            name = data.draw(st.sampled_from(sorted(own)), label="remove")
            mt.remove_task(name)
            del own[name]
        else:
            b = data.draw(st.integers(0, 6), label="batch")
            names = data.draw(st.lists(st.sampled_from(["base"] + list(mt.tasks)), min_size=b, max_size=b),
                              label="names")
            ids = torch.tensor([mt.task_index(n) for n in names], dtype=torch.int64)
            dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8]), label="id dtype")
            x = torch.randn(b, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            with torch.no_grad():
                out = mt(x, ids.to(dtype))
                assert out.shape[0] == b
                models = [own[n] for n in mt.tasks]
                check_rows(out, oracle_rows(x, ids, models, _base()), ids, models, _base())


_CACHE = {}


def _plain():
    if "plain" not in _CACHE:
        _CACHE["plain"] = make_plain("test_resnet")
    return _CACHE["plain"]


def _copy(m):
    import copy
    return copy.deepcopy(m)


def _base():
    if "base" not in _CACHE:
        from taps_fast import convert
        _CACHE["base"] = convert(_copy(_plain())).eval()
    return _CACHE["base"]


def _task(plain, seed):
    key = ("task", seed)
    if key not in _CACHE:
        _CACHE[key] = make_task(plain, seed=seed, classes=2 + seed % 6).eval()
    return _CACHE[key]


# ----------------------------------------------------------------------------- the scratch buffer
def test_weight_sum_reuses_one_buffer_per_thread():
    """W + ΔW of a serving call goes into the thread's scratch buffer: exact sums, one buffer per
    dtype (grown to the largest layer), reused by smaller layers, and none carried by a copy."""
    import copy

    from taps_fast.multitask._context import _Context

    ctx = _Context()
    g = torch.Generator().manual_seed(0)
    small = (torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))
    big = (torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g))
    a = ctx.weight_sum(*small)
    assert torch.equal(a, small[0] + small[1]) and a.shape == (3, 4)
    b = ctx.weight_sum(*big)
    assert torch.equal(b, big[0] + big[1]) and b.shape == (5, 2, 3, 3)
    c = ctx.weight_sum(*small)
    assert torch.equal(c, small[0] + small[1])
    assert c.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # reused, not grown
    d = ctx.weight_sum(small[0].double(), small[1].double())
    assert d.dtype == torch.float64 and len(ctx.scratch) == 2
    assert copy.deepcopy(ctx).scratch == {}
    seen = []
    t = threading.Thread(target=lambda: seen.append(ctx.weight_sum(*small)))
    t.start()
    t.join()
    assert seen[0].untyped_storage().data_ptr() != c.untyped_storage().data_ptr()  # its own buffer
