"""MultiTaskModel's rows and slot pools: adding or removing a task writes only that task's row and
slots (in place, no re-stacking), the pools grow by pool_chunk, prepare_task writes nothing, and
the bytes are accounted for. Every serving check is against each task's own model (the oracles
of test_multitask.py)."""
import copy
import threading

import pytest
import torch
import torch.nn as nn

from taps_fast import MultiTaskModel, TaskFileError, convert, save_task, taps_layers
from taps_fast.multitask import MultiTaskHead, PreparedTask
from taps_fast.multitask.layers import _MTGated
from taps_fast.multitask.norms import _MTNorm

from test_multitask import assert_compiled_matches_eager, build, check_rows, make_plain, make_task, oracle_rows


def _layers(mt):
    return [m for m in mt.modules() if isinstance(m, _MTGated)]


def _norms(mt):
    return [m for m in mt.modules() if isinstance(m, _MTNorm)]


def _heads(mt):
    return [m for m in mt.modules() if isinstance(m, MultiTaskHead)]


def _pointers(mt):
    """data_ptr of every per-row tensor and delta pool."""
    out = {}
    for i, m in enumerate(_layers(mt)):
        for k in ("deltas", "scores", "slot", "thresholds"):
            out[f"layer{i}.{k}"] = getattr(m, k).data_ptr()
    for i, m in enumerate(_norms(mt)):
        for k in m.keys + m.buffer_keys:
            out[f"norm{i}.{k}"] = getattr(m, k).data_ptr()
    return out


def _serve_check(mt, own, base_oracle, seed=0, B=8):
    """A mixed batch over every task and the base against each one's own model."""
    T = len(mt.tasks)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, T, (B,), generator=g)
    models = [own[n] for n in mt.tasks]
    with torch.no_grad():
        out = mt(x, ids)
        rows = oracle_rows(x, ids, models, base_oracle)
    check_rows(out, rows, ids, models, base_oracle)


def _check_pools(mt):
    """The pool invariants: rows a multiple of pool_chunk, the free rows and slots
    exactly those no task holds, and every free row and slot zero (placeholders for heads)."""
    chunk = mt.pool_chunk
    stats = mt.pool_stats()
    assert stats["tasks"] == len(mt.tasks) == len(mt._row_of)
    assert stats["rows"] % chunk == 0 and stats["rows"] == stats["tasks"] + stats["free_rows"]
    free = set(range(stats["rows"])) - set(mt._row_of)
    assert sorted(free) == sorted(mt._free_rows) and len(set(mt._row_of)) == len(mt._row_of)
    assert mt._row_table.tolist() == [-1] + mt._row_of
    for m in _layers(mt):
        assert m.num_rows == stats["rows"]
        used = set(m._slot_of.values())
        assert used.isdisjoint(m._free_slots) and len(used) + len(m._free_slots) == m.deltas.shape[0]
        for r in free:
            assert int(m.slot[r]) == -1 and float(m.scores.detach()[r]) == 0 and float(m.thresholds[r]) == 0
        for s in m._free_slots:
            assert not m.deltas[s].any()
        assert m.slot.tolist() == [m._slot_of.get(r, -1) for r in range(m.num_rows)]
    for m in _norms(mt):
        for k in m.keys + m.buffer_keys:
            t = getattr(m, k)
            assert t.shape[0] == stats["rows"]
            for r in free:
                assert not t[r].any()
    for h in _heads(mt):
        assert len(h.tasks) == stats["rows"]
        for r in free:
            p = h.tasks[r]
            assert (type(p) is nn.Linear and p.out_features == 0) or type(p) is nn.Identity
    assert stats["bytes_used"] == sum(mt.task_bytes(n) for n in mt.tasks) <= stats["bytes_allocated"]
    assert stats["delta_slots_used"] <= stats["delta_slots"]


# ----------------------------------------------------------------------------- steady state
def test_steady_state_add_after_remove_moves_nothing():
    """Removing a task and adding one that opens the same layers (the pools at their high-water
    mark) writes in place: every pool keeps its storage (data_ptr), requires_grad is kept, and
    the model still serves every task exactly."""
    mt, tasks, base_oracle = build("test_resnet", T=3)
    mt.eval()
    own = {f"t{i}": t.eval() for i, t in enumerate(tasks)}
    before = _pointers(mt)
    for step in range(3):
        victim = mt.tasks[step % len(mt.tasks)]
        mt.remove_task(victim)
        name = f"n{step}"
        own[name] = own.pop(victim)  # the same layers open: its freed slots are reused
        mt.add_task(name, own[name])
        assert _pointers(mt) == before
        _check_pools(mt)
        _serve_check(mt, own, base_oracle.eval(), seed=step)
    assert all(m.deltas.requires_grad and m.scores.requires_grad for m in _layers(mt))


def test_delta_pools_grow_by_a_quarter():
    """A delta pool grows by a quarter of its slots (at least one) when full: built by adds
    only, it holds at most a quarter (or one slot) more than its tasks use."""
    plain = make_plain("test_resnet")
    mt = MultiTaskModel(copy.deepcopy(plain)).eval()
    layer = _layers(mt)[0]
    caps = []
    for i in range(14):
        t = make_task(plain, seed=i + 1, classes=3, close_every=10 ** 6)  # every layer open
        mt.add_task(f"t{i}", t)
        caps.append(layer.deltas.shape[0])
    assert caps == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 15, 15]
    for m in _layers(mt):
        used = m.slots_used
        assert used <= m.deltas.shape[0] <= max(used + 1, used * 5 // 4 + 1)


def test_pools_grow_by_chunk_and_never_shrink():
    plain = make_plain("test_resnet")
    mt = MultiTaskModel(copy.deepcopy(plain), pool_chunk=2).eval()
    base_oracle = convert(copy.deepcopy(plain)).eval()
    own = {}
    for i in range(5):
        own[f"t{i}"] = make_task(plain, seed=i + 1, classes=3 + i).eval()
        mt.add_task(f"t{i}", own[f"t{i}"])
        assert mt.pool_stats()["rows"] == 2 * ((i + 2) // 2)
        _check_pools(mt)
    assert mt._row_of == [0, 1, 2, 3, 4]
    slots = [m.deltas.shape[0] for m in _layers(mt)]
    rows = mt.pool_stats()["rows"]
    # a pool grown while its deltas do not train keeps requires_grad=False
    layer = _layers(mt)[1]
    layer.deltas.requires_grad_(False)
    mt.remove_task("t1")
    mt.remove_task("t3")  # public ids shift; rows 1 and 3 are free
    assert mt._row_of == [0, 2, 4] and mt.pool_stats()["free_rows"] == 3
    assert [m.deltas.shape[0] for m in _layers(mt)] == slots and mt.pool_stats()["rows"] == rows
    _check_pools(mt)
    _serve_check(mt, own, base_oracle)
    for name, seed in (("a", 20), ("b", 21), ("c", 22), ("d", 23)):
        own[name] = make_task(plain, seed=seed, classes=5).eval()
        mt.add_task(name, own[name])
        _check_pools(mt)
    assert mt._row_of == [0, 2, 4, 1, 3, 5, 6]  # lowest free row first, then a new chunk
    assert mt.pool_stats()["rows"] == 8
    assert layer.deltas.requires_grad is False
    _serve_check(mt, own, base_oracle, seed=1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8", None])
def test_pool_chunk_is_validated(bad):
    with pytest.raises(ValueError, match="pool_chunk must be an int >= 1"):
        MultiTaskModel(make_plain("test_resnet"), pool_chunk=bad)


# ----------------------------------------------------------------------------- random sequences
@pytest.mark.parametrize("cpu_chunk,pool_chunk", [(3, 2), (0, 3), (8, 1)], ids=["chunks-2", "mixed-3", "chunks-1"])
def test_random_add_remove_sequence_matches_each_tasks_model(cpu_chunk, pool_chunk, tmp_path):
    """A random sequence of adds (from a model or a file) and removes, each step checked against
    every task's own model, with the pool invariants."""
    plain = make_plain("test_resnet")
    base_oracle = convert(copy.deepcopy(plain)).eval()
    mt = MultiTaskModel(copy.deepcopy(plain), cpu_chunk=cpu_chunk, pool_chunk=pool_chunk).eval()
    g = torch.Generator().manual_seed(pool_chunk)
    own, seed = {}, 0
    for step in range(14):
        if own and (len(own) >= 6 or torch.rand((), generator=g) < 0.4):
            name = sorted(own)[int(torch.randint(len(own), (), generator=g))]
            mt.remove_task(name)
            del own[name]
        else:
            seed += 1
            name = f"s{seed}"
            model = make_task(plain, seed=seed, classes=2 + seed % 5, close_every=2 + seed % 3).eval()
            if seed % 2:
                path = tmp_path / f"{name}.safetensors"
                save_task(model, path)
                mt.add_task(name, path)
            else:
                mt.add_task(name, model)
            own[name] = model
        assert sorted(mt.tasks) == sorted(own)
        _check_pools(mt)
        _serve_check(mt, own, base_oracle, seed=step)


# ----------------------------------------------------------------------------- prepare / add_prepared
def test_prepare_task_writes_nothing_and_add_prepared_commits(tmp_path):
    mt, tasks, base_oracle = build("test_resnet", T=2)
    mt.eval()
    plain = make_plain("test_resnet")
    new = make_task(plain, seed=7, classes=6).eval()
    path = tmp_path / "new.safetensors"
    save_task(new, path)
    state = {k: v.clone() for k, v in mt.state_dict().items()}
    ptrs, stats = _pointers(mt), mt.pool_stats()
    prepared = [mt.prepare_task("f", path), mt.prepare_task("m", new)]
    now = mt.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert _pointers(mt) == ptrs and mt.pool_stats() == stats and mt.tasks == ["t0", "t1"]
    for p in prepared:
        assert isinstance(p, PreparedTask) and p.fingerprint == mt.fingerprint and p.labels is None
        for n, (score, _, delta) in p.plan.layers.items():
            assert score.dtype == torch.float64 and (delta is None or delta.dtype == torch.float64)
    # a model's tensors are copied: the prepared task is a snapshot of the model
    for name, layer in taps_layers(new):
        d = prepared[1].plan.layers[name][2]
        assert d is None or d.data_ptr() != layer.delta.data_ptr()
    own = {"t0": tasks[0].eval(), "t1": tasks[1].eval(), "f": new, "m": new}
    for p in prepared:
        mt.add_prepared(p)
        assert mt.task_bytes(p.name) == p.nbytes
    _check_pools(mt)
    _serve_check(mt, own, base_oracle.eval())
    with pytest.raises(ValueError, match="add_prepared: a task named 'f' exists already"):
        mt.add_prepared(prepared[0])
    with pytest.raises(TypeError, match="expected a PreparedTask"):
        mt.add_prepared(("f", None))
    # add_prepared copied the plan: changing the added task leaves the PreparedTask as it was,
    # and it can be added again after a remove (a server's host cache)
    with torch.no_grad():
        _heads(mt)[0].tasks[mt._row_of[mt.tasks.index("m")]].weight.mul_(0)
        _layers(mt)[1].deltas.mul_(0)
    assert torch.equal(prepared[1].plan.heads["fc"].weight, new.get_classifier().weight)
    for name, layer in taps_layers(new):
        d = prepared[1].plan.layers[name][2]
        assert d is None or torch.equal(d, layer.delta)
    mt.remove_task("f")
    mt.remove_task("m")
    mt.add_prepared(prepared[1])
    mt.add_prepared(prepared[0])
    assert mt.tasks == ["t0", "t1", "m", "f"]
    mt2, _, _ = build("test_resnet", T=2)  # t0 and t1 as they were (layer 1's deltas were zeroed)
    for n in ("m", "f"):
        mt.remove_task(n)
    mt = mt2.eval()
    for p in prepared:
        mt.add_prepared(p)
    _serve_check(mt, own, base_oracle, seed=1)
    other = MultiTaskModel(make_plain("test_resnet", seed=9))
    with pytest.raises(TaskFileError, match="prepared for a different base model"):
        other.add_prepared(prepared[1])


def test_prepare_task_raises_what_add_task_raises(tmp_path):
    mt, _, _ = build("test_resnet", T=2)
    other = make_task(make_plain("test_resnet", seed=9), seed=1, classes=3)
    path = tmp_path / "other.safetensors"
    save_task(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    vit = make_task(make_plain("test_vit"), seed=1, classes=3)
    cases = [("other", path), ("other", other), ("vit", vit), ("t0", path), ("base", path), ("", path),
             ("junk", tmp_path / "junk.safetensors"), ("x", 3), ("gone", tmp_path / "missing.safetensors")]
    state = {k: v.clone() for k, v in mt.state_dict().items()}
    for name, source in cases:
        errors = []
        for call in (mt.prepare_task, mt.add_task):
            with pytest.raises(Exception) as info:
                call(name, source)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], (name, errors)
    now = mt.state_dict()
    assert mt.tasks == ["t0", "t1"] and all(torch.equal(now[k], state[k]) for k in state)


def test_prepare_in_a_thread_while_forwards_run(tmp_path):
    """A loader thread prepares tasks while the model serves: every forward gives its serial
    result, and the prepared tasks then serve as their own models."""
    mt, tasks, base_oracle = build("test_resnet", T=2)
    mt.eval()
    plain = make_plain("test_resnet")
    new = {f"n{s}": make_task(plain, seed=s, classes=3).eval() for s in (5, 6, 7)}
    paths = {}
    for n, m in new.items():
        paths[n] = tmp_path / f"{n}.safetensors"
        save_task(m, paths[n])
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(-1, 2, (4,), generator=g))
             for _ in range(6)]
    with torch.no_grad():
        serial = [mt(x, ids) for x, ids in calls]
    prepared, errors, done = {}, [], threading.Event()

    def loader():
        try:
            for _ in range(2):
                for n in new:
                    prepared[n] = mt.prepare_task(n, paths[n] if n != "n6" else new[n])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=loader)
    t.start()
    rounds = 0
    with torch.no_grad():
        while not done.is_set() or rounds < 2:
            for (x, ids), want in zip(calls, serial):
                assert torch.equal(mt(x, ids), want)
            rounds += 1
    t.join(timeout=120)
    assert not errors, errors[0]
    for p in prepared.values():
        mt.add_prepared(p)
    own = {"t0": tasks[0].eval(), "t1": tasks[1].eval(), **new}
    _serve_check(mt, own, base_oracle.eval())


# ----------------------------------------------------------------------------- bytes
def _own_bytes(model, mt):
    """What a task adds, from its own model: open deltas, per gated layer a score, a threshold
    (the score dtype) and a slot entry (int32), its norm state and its head."""
    total = 0
    for _, layer in taps_layers(model):
        total += 2 * layer.score.element_size() + 4
        if layer.is_open:
            total += layer.delta.numel() * layer.delta.element_size()
    norm_names = {n[len("base."):] for n, m in mt.named_modules() if isinstance(m, _MTNorm)}
    for name, mod in model.named_modules():
        if name in norm_names:
            total += sum(t.numel() * t.element_size() for t in mod.state_dict().values())
    head = model.get_classifier()
    total += sum(t.numel() * t.element_size() for t in head.state_dict().values())
    return total


def test_bytes_accounting(tmp_path):
    mt, tasks, _ = build("test_resnet", T=3, pool_chunk=1)
    for i, t in enumerate(tasks):
        assert mt.task_bytes(f"t{i}") == _own_bytes(t, mt)
    stats = mt.pool_stats()
    assert stats["bytes_used"] == sum(mt.task_bytes(n) for n in mt.tasks)
    assert stats["bytes_allocated"] == stats["bytes_used"]  # pool_chunk=1, nothing removed: no slack
    assert stats["delta_slots_used"] == stats["delta_slots"] == sum(
        sum(1 for _, l in taps_layers(t) if l.is_open) for t in tasks)
    with pytest.raises(ValueError, match="base model is not a task"):
        mt.task_bytes("base")
    with pytest.raises(KeyError, match="unknown task"):
        mt.task_bytes("nope")
    new = make_task(make_plain("test_resnet"), seed=8, classes=9)
    path = tmp_path / "new.safetensors"
    save_task(new, path)
    for source in (path, new):
        before = mt.pool_stats()
        p = mt.prepare_task("new", source)
        assert p.nbytes == _own_bytes(new, mt)
        mt.add_prepared(p)
        after = mt.pool_stats()
        assert after["bytes_used"] == before["bytes_used"] + p.nbytes == sum(mt.task_bytes(n) for n in mt.tasks)
        mt.remove_task("new")
        again = mt.pool_stats()
        assert again["bytes_used"] == before["bytes_used"]
        head = sum(t.numel() * t.element_size() for t in new.get_classifier().state_dict().values())
        # the pools keep their capacity for the next task; the head's module is dropped
        assert again["bytes_allocated"] == after["bytes_allocated"] - head
        _check_pools(mt)


# ----------------------------------------------------------------------------- the head cache
def test_head_cache_is_invalidated(tmp_path):
    mt, tasks, base_oracle = build("test_resnet", T=2, cpu_chunk=0)
    mt.eval()
    own = {"t0": tasks[0].eval(), "t1": tasks[1].eval()}
    head = _heads(mt)[0]
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([0, 1, -1, 1])
    mt(x, ids)  # a gradient may be needed: no cache
    assert head._cat_cache is None
    with torch.no_grad():
        first = mt(x, ids)
        cache = head._cat_cache
        assert cache is not None
        assert torch.equal(mt(x, ids), first) and head._cat_cache is cache  # a hit
        head.tasks[mt._row_of[1]].weight.mul_(2)  # in place: its version counter moves
        own["t1"].get_classifier().weight.mul_(2)
    _serve_check(mt, own, base_oracle.eval())
    assert head._cat_cache is not cache
    with torch.no_grad():
        mt(x, ids)
    assert head._cat_cache is not None
    mt.remove_task("t0")
    assert head._cat_cache is None
    own.pop("t0")
    _serve_check(mt, own, base_oracle)
    new = make_task(make_plain("test_resnet"), seed=5, classes=8).eval()
    mt.add_task("n", new)
    assert head._cat_cache is None
    own["n"] = new
    _serve_check(mt, own, base_oracle, seed=2)
    with torch.no_grad():
        mt(x, ids)
        key = head._cat_cache[0]
        mt.float()
        mt(x.float(), ids)
        assert head._cat_cache[0] != key  # another dtype: rebuilt


def test_tasks_added_under_inference_mode_serve_exactly():
    """Heads made under torch.inference_mode are inference tensors (no version counter): the
    head concatenates them every call instead of caching, and still answers exactly."""
    plain = make_plain("test_resnet")
    tasks = [make_task(plain, seed=s, classes=3 + s).eval() for s in (1, 2)]
    base_oracle = convert(copy.deepcopy(plain)).eval()
    mt = MultiTaskModel(copy.deepcopy(plain), cpu_chunk=0).eval()
    with torch.inference_mode():
        for i, t in enumerate(tasks):
            mt.add_task(f"t{i}", t)
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        y = mt(x, torch.tensor([0, 1, -1, 1]))
    assert _heads(mt)[0]._cat_cache is None
    assert torch.isfinite(y[:, :3]).all()
    _serve_check(mt, {"t0": tasks[0], "t1": tasks[1]}, base_oracle)


# ----------------------------------------------------------------------------- placeholders
class _Tiny(nn.Module):
    """conv, BatchNorm, pooling and a head that is not an nn.Linear (placeholders: nn.Identity)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("cpu_chunk", [3, 0], ids=["chunks", "mixed"])
def test_free_rows_with_a_non_linear_head(cpu_chunk):
    torch.manual_seed(0)
    plain = _Tiny().double()
    base_oracle = convert(copy.deepcopy(plain), head="head").eval()
    mt = MultiTaskModel(copy.deepcopy(plain), cpu_chunk=cpu_chunk, head="head").eval()
    own = {}
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        m = convert(copy.deepcopy(plain), head="head")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n not in ("conv.weight", "conv.bias"):  # the frozen base stays as it is
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
            m.bn.running_mean.add_(0.1 * i)
        own[f"t{i}"] = m.eval()
        mt.add_task(f"t{i}", m)
    mt.remove_task("t1")
    del own["t1"]
    assert type(_heads(mt)[0].tasks[1]) is nn.Identity
    _check_pools(mt)
    _serve_check(mt, own, base_oracle)


# ----------------------------------------------------------------------------- labels
def test_labels_through_the_model(tmp_path):
    mt, tasks, _ = build("test_resnet", T=1)
    path = tmp_path / "t.safetensors"
    labels = [f"class {i}" for i in range(3)]  # task 0 has 3 classes
    save_task(tasks[0], path, labels=labels)
    p = mt.prepare_task("lab", path)
    assert p.labels == labels
    mt.add_prepared(p)
    assert mt.task_labels("lab") == labels and mt.task_labels("t0") is None and mt.task_labels("base") is None
    out = tmp_path / "again.safetensors"
    mt.save_task("lab", out)  # the labels it was added with
    mt.add_task("again", out)
    assert mt.task_labels("again") == labels
    mt.save_task("t0", out, labels=["a", "b", "c"])
    mt.add_task("t0b", out)
    assert mt.task_labels("t0b") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 labels for the head 'fc', which has 3 outputs"):
        mt.save_task("t0", out, labels=["a", "b"])
    wrong = tmp_path / "wrong.safetensors"
    save_task(tasks[0], wrong)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from taps_fast.checkpoint import _checksum
    with safe_open(str(wrong), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["labels"] = '["a","b","c","d"]'
    meta["checksum"] = _checksum(tensors.items(), meta)
    save_file(tensors, str(wrong), metadata=meta)
    for call in (mt.prepare_task, mt.add_task):
        with pytest.raises(TaskFileError, match="4 labels for the head 'fc', which has 3 outputs"):
            call("wrong", wrong)
    mt.remove_task("lab")
    assert "lab" not in mt._labels


# ----------------------------------------------------------------------------- compile
def test_torch_compile_fullgraph_with_free_rows():
    """After a remove (rows no longer the public ids, a placeholder head, free rows in every
    table) the mixed batch still traces whole and matches eager."""
    mt, _, _ = build("test_resnet", T=3)
    mt.remove_task("t0")
    mt = mt.float().eval()
    x = torch.randn(5, 3, 32, 32)
    ids = torch.tensor([1, -1, 0, 1, 0])
    assert_compiled_matches_eager(mt, x, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_add_prepared_takes_a_cpu_plan_into_a_cuda_model():
    """A task prepared on the CPU (a host cache) added to the model on the GPU: copied across,
    the head moved (a copy: the PreparedTask stays on the CPU), the same outputs as on the CPU."""
    mt, _, _ = build("test_resnet", T=2)
    mt = mt.float().eval()
    gpu = copy.deepcopy(mt).cuda()
    new = make_task(make_plain("test_resnet"), seed=5, classes=6).float().eval()
    p = gpu.prepare_task("n", new, device="cpu")  # for a host cache
    assert p.plan.heads["fc"].weight.device.type == "cpu"
    assert all(s.device.type == "cpu" and (d is None or d.device.type == "cpu") for s, _, d in p.plan.layers.values())
    assert gpu.prepare_task("n", new).plan.heads["fc"].weight.device.type == "cuda"
    mt.add_prepared(p)
    gpu.add_prepared(p)
    assert p.plan.heads["fc"].weight.device.type == "cpu"
    assert gpu.task_bytes("n") == p.nbytes == mt.task_bytes("n")
    _check_pools(gpu)
    x = torch.randn(6, 3, 32, 32)
    ids = torch.tensor([2, 0, -1, 2, 1, 2])
    with torch.no_grad():
        want = mt(x, ids)
        got = gpu(x.cuda(), ids.cuda()).cpu()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], rtol=1e-2, atol=1e-2)  # TF32 on the GPU


# ----------------------------------------------------------------------------- the CPU path's choice
@pytest.mark.parametrize("ids,chunks", [([0, 0, 0, 0, 1, 1, 1, 1], True),  # 2 tasks present, 4 rows each
                                         ([0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1], True),  # base counts as one
                                         ([0, 1, -1, 2, 3, 0, 1, 2], False),  # 5 present in 8 rows
                                         ([1, 1], True)])  # one task present: always chunks
def test_cpu_path_choice(monkeypatch, ids, chunks):
    """In eval, the CPU runs chunks when one task is present or the tasks present average
    CPU_CHUNK_MIN_ROWS rows or more, else the mixed-batch ops; both answer as each task's own model."""
    monkeypatch.setattr(MultiTaskModel, "CPU_CHUNK_MIN_ROWS", 4)
    mt, tasks, base_oracle = build("test_resnet", T=4)
    mt.eval()
    calls = []
    real = mt._forward_chunks
    monkeypatch.setattr(mt, "_forward_chunks", lambda x, i: calls.append(1) or real(x, i))
    x = torch.randn(len(ids), 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = mt(x, torch.tensor(ids))
    present = len(set(ids))
    assert bool(calls) == (present == 1 or present * 4 <= len(ids)) == chunks
    own = [t.eval() for t in tasks]
    with torch.no_grad():
        check_rows(y, oracle_rows(x, torch.tensor(ids), own, base_oracle.eval()), torch.tensor(ids), own, base_oracle)
    if chunks:  # training chunks too (BatchNorm statistics over each task's rows: 2+ rows each)
        mt.train()
        calls.clear()
        mt(x, torch.tensor(ids))
        assert calls
