"""MultiTaskModel: mixed-batch serving and joint training against each task's own model.

The oracle for every test is the task's own converted model (what a user would run for one task),
on the CPU reference path, float64 where the comparison must be exact.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from taps_fast import MultiTaskModel, TaskFileError, convert, save_task, taps_layers
from taps_fast.multitask import MultiTaskBatchNorm, MultiTaskHead, MultiTaskLayerNorm

from helpers import RTOL_MODEL, assert_rel_close

SIZES = {"test_resnet": 32, "test_vit": 32, "test_efficientnet_gn": 32}


def make_plain(arch, seed=0):
    torch.manual_seed(seed)
    kw = {"img_size": SIZES[arch]} if "vit" in arch else {}
    return timm.create_model(arch, pretrained=False, num_classes=5, **kw).double()


def make_task(plain, seed, classes, close_every=3):
    """A converted copy of the base with its own head size, a third of its layers closed (their
    deltas zero, as load_task leaves them), random deltas, norms and head."""
    m = copy.deepcopy(plain)
    m.reset_classifier(classes)
    m = convert(m.double())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(taps_layers(m)):
            closed = (i + seed) % close_every == 0
            layer.score.fill_(0.02 if closed else 0.2 + 0.01 * seed)
            layer.delta.copy_(0 if closed else torch.randn(layer.delta.shape, generator=g, dtype=torch.float64) * 0.05)
        for mod in m.modules():
            for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if mod.__class__.__name__.endswith("Norm") or "Norm" in type(mod).__name__:
                    if p.is_floating_point():
                        p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.2)
        head = m.get_classifier()
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float64))
    return m


def build(arch, T=4, via_file=(), tmp_path=None, classes=None, cpu_chunk=8, pool_chunk=8):
    plain = make_plain(arch)
    tasks = [make_task(plain, seed=s + 1, classes=(classes or [3, 7, 5, 2, 4, 6])[s % 6]) for s in range(T)]
    base_oracle = convert(copy.deepcopy(plain))
    mt = MultiTaskModel(copy.deepcopy(plain), cpu_chunk=cpu_chunk, pool_chunk=pool_chunk)
    for i, t in enumerate(tasks):
        if i in via_file:
            path = tmp_path / f"t{i}.safetensors"
            save_task(t, path)
            mt.add_task(f"t{i}", path)
        else:
            mt.add_task(f"t{i}", t)
    return mt, tasks, base_oracle


def ids_for(dist, B, T, g):
    if dist == "uniform":
        return torch.randint(-1, T, (B,), generator=g)
    if dist == "zipf":  # zipf(1.5) over the tasks, base included as rank T+1
        p = 1.0 / torch.arange(1, T + 2, dtype=torch.float64) ** 1.5
        r = torch.multinomial(p, B, replacement=True, generator=g)
        return torch.where(r == T, -1, r)
    if dist == "single":
        return torch.full((B,), 2)
    if dist == "some_absent":  # tasks 0 and 3 have no rows
        return torch.tensor([1, 2, -1, 2, 1, 1, 2, -1, 2][:B])
    if dist == "all_base":
        return torch.full((B,), -1)
    raise ValueError(dist)


def oracle_rows(x, ids, tasks, base_oracle):
    rows = []
    for i in range(x.shape[0]):
        t = int(ids[i])
        model = base_oracle if t < 0 else tasks[t]
        rows.append(model(x[i:i + 1])[0])
    return rows


def check_rows(out, rows, ids, tasks, base_oracle, dtype=torch.float64):
    for i, r in enumerate(rows):
        c = r.shape[-1]
        assert_rel_close(out[i, :c], r, dtype, f"row {i} (task {int(ids[i])})", bounds=RTOL_MODEL)
        assert torch.isneginf(out[i, c:]).all(), f"row {i}: padding past its {c} outputs must be -inf"


# CPU paths: task-pure chunks (cpu_chunk=3: a task with more samples is cut, the default path
# on a CPU) and the mixed-batch ops in one call (cpu_chunk=0: the GPU's path).
PATHS = pytest.mark.parametrize("cpu_chunk", [3, 0], ids=["chunks", "mixed"])


@PATHS
@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("dist", ["uniform", "zipf", "single", "some_absent", "all_base"])
def test_mixed_batch_matches_each_tasks_model(arch, dist, cpu_chunk, tmp_path):
    mt, tasks, base_oracle = build(arch, T=4, via_file=(1,), tmp_path=tmp_path, cpu_chunk=cpu_chunk)
    for m in [mt, base_oracle] + tasks:
        m.eval()
    g = torch.Generator().manual_seed(3)
    B = 9
    x = torch.randn(B, 3, SIZES[arch], SIZES[arch], generator=g, dtype=torch.float64)
    ids = ids_for(dist, B, 4, g)
    with torch.no_grad():
        out = mt(x, ids)
        rows = oracle_rows(x, ids, tasks, base_oracle)
    assert out.shape == (B, max(7, 5))  # widest head over the base (5) and every task
    check_rows(out, rows, ids, tasks, base_oracle)


def test_layers_hold_open_deltas_only():
    """Each layer's slot pool holds the open deltas only (one slot per task that opened it, the
    other slots free), in a pool at most a quarter (or one slot) larger than that."""
    for chunk in (8, 1):
        mt, tasks, _ = build("test_resnet", T=4, pool_chunk=chunk)
        layers = [m for m in mt.modules() if hasattr(m, "slot")]
        assert layers
        total_open = 0
        for layer in layers:
            used = int((layer.slot >= 0).sum())
            assert used == layer.slots_used
            assert used <= layer.deltas.shape[0] <= max(used + 1, used * 5 // 4 + 1)
            total_open += used
        expected = sum(sum(1 for _, l in taps_layers(t) if l.is_open) for t in tasks)
        assert total_open == expected
    kinds = {type(m) for m in mt.modules()}
    assert MultiTaskBatchNorm in kinds and MultiTaskHead in kinds
    vit, _, _ = build("test_vit", T=2)
    assert MultiTaskLayerNorm in {type(m) for m in vit.modules()}


def test_names_and_ids_agree():
    mt, tasks, base_oracle = build("test_resnet", T=3)
    mt.eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    names = ["t2", "base", "t0", "t2"]
    with torch.no_grad():
        a = mt(x, names)
        b = mt(x, torch.tensor([2, -1, 0, 2]))
    assert torch.equal(a, b)
    assert mt.num_outputs("t1") == 7 and mt.num_outputs("base") == 5


@PATHS
@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_joint_training_gradients_equal_each_tasks_own(arch, cpu_chunk):
    """One mixed batch, train mode: every task's deltas, scores, norms and head get the
    gradients of its own model trained on its rows alone (per-task BatchNorm statistics)."""
    mt, tasks, _ = build(arch, T=3, cpu_chunk=cpu_chunk)
    mt.train()
    for t in tasks:
        t.train()
    g = torch.Generator().manual_seed(7)
    B = 10
    x = torch.randn(B, 3, SIZES[arch], SIZES[arch], generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 2, 1, 0, -1, 2, 2, 1, 0, -1])
    labels = torch.tensor([1, 0, 2, 2, 0, 1, 0, 1, 0, 3])
    out = mt(x, ids)
    F.cross_entropy(out, labels, reduction="sum").backward()
    layers = {n: m for n, m in mt.named_modules() if hasattr(m, "slot")}
    norms = {n: m for n, m in mt.named_modules() if isinstance(m, (MultiTaskBatchNorm, MultiTaskLayerNorm))}
    heads = [m for m in mt.modules() if isinstance(m, MultiTaskHead)]
    for t, model in enumerate(tasks):
        rows = (ids == t).nonzero().flatten()
        F.cross_entropy(model(x[rows]), labels[rows], reduction="sum").backward()
        r = mt._row_of[t]  # the task's row (its public id here: no task was removed)
        for name, layer in taps_layers(model):
            mtl = layers["base." + name]
            ds = mtl.scores.grad[r] if mtl.scores.grad is not None else torch.zeros((), dtype=torch.float64)
            assert_rel_close(ds, layer.score.grad, torch.float64, bounds=RTOL_MODEL, what=f"ds {name} task {t}")
            s = int(mtl.slot[mt._row_of[t]])
            if layer.is_open:
                assert_rel_close(mtl.deltas.grad[s], layer.delta.grad, torch.float64, bounds=RTOL_MODEL, what=f"dΔW {name} task {t}")
        for name, mod in model.named_modules():
            key = "base." + name
            if key in norms:
                for k, p in mod.named_parameters(recurse=False):
                    assert_rel_close(getattr(norms[key], k).grad[r], p.grad, torch.float64, bounds=RTOL_MODEL, what=f"d{k} {name} task {t}")
                if isinstance(norms[key], MultiTaskBatchNorm):
                    assert_rel_close(norms[key].running_mean[r], mod.running_mean, torch.float64, bounds=RTOL_MODEL, what=f"running mean {name}")
                    assert_rel_close(norms[key].running_var[r], mod.running_var, torch.float64, bounds=RTOL_MODEL, what=f"running var {name}")
        head = model.get_classifier()
        assert_rel_close(heads[0].tasks[r].weight.grad, head.weight.grad, torch.float64, bounds=RTOL_MODEL, what=f"head task {t}")
    # the shared base stays frozen: only the tasks' stacks and heads train
    trainable = {n for n, p in mt.named_parameters() if p.requires_grad}
    expected = {n for n, p in mt.named_parameters()
                if n.rsplit(".", 1)[-1] in ("deltas", "scores") or ".tasks." in n
                or (n.rsplit(".", 1)[0] in norms and n.rsplit(".", 1)[-1] in ("weight", "bias"))}
    assert trainable == expected, sorted(trainable ^ expected)[:5]


def test_export_round_trip(tmp_path):
    mt, tasks, _ = build("test_resnet", T=3)
    path = tmp_path / "t1.safetensors"
    mt.save_task("t1", path)
    fresh = copy.deepcopy(tasks[1])
    from taps_fast import load_task
    with torch.no_grad():
        for _, l in taps_layers(fresh):
            l.delta.zero_()
    load_task(fresh, path)
    fresh.eval(), tasks[1].eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh(x), tasks[1](x))


def test_remove_task_shifts_ids():
    mt, tasks, base_oracle = build("test_resnet", T=3)
    for m in [mt, base_oracle] + tasks:
        m.eval()
    mt.remove_task("t1")
    assert mt.tasks == ["t0", "t2"]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([1, 0, -1])
    with torch.no_grad():
        out = mt(x, ids)
        rows = oracle_rows(x, torch.tensor([2, 0, -1]), tasks, base_oracle)
    check_rows(out, rows, ids, tasks, base_oracle)


def test_memory_is_base_plus_open_deltas():
    """pool_chunk=1: the pools hold exactly the tasks (a larger chunk holds free slots too)."""
    plain = make_plain("test_resnet")
    base_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    mt, tasks, _ = build("test_resnet", T=4, pool_chunk=1)
    open_bytes = sum(l.delta.numel() * l.delta.element_size() for t in tasks for _, l in taps_layers(t) if l.is_open)
    extra = mt.weight_bytes() - base_bytes - open_bytes
    # what is left: norms (params + running stats), heads, scores, slot maps: small
    assert 0 <= extra < 0.1 * base_bytes, extra


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    mt, tasks, _ = build("test_resnet", T=2)
    return mt.eval()


def _snapshot(mt):
    return {k: v.clone() for k, v in mt.state_dict().items()}, list(mt.tasks)


def _unchanged(mt, snap):
    state, names = snap
    now = mt.state_dict()
    assert list(mt.tasks) == names and set(now) == set(state)
    assert all(now[k].shape == state[k].shape and torch.equal(now[k], state[k]) for k in state)


def test_bad_task_ids(small):
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(KeyError, match="unknown task 'nope'.*t0"):
        small(x, ["t0", "nope", "base"])
    with pytest.raises(ValueError, match="task id 2 is out of range"):
        small(x, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="task id -2 is out of range"):
        small(x, torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        small(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 task ids for a batch of 3"):
        small(x, ["t0", "t1"])
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        small(x, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="task_ids is on meta"):
        small(x, torch.tensor([0, 1, 0], device="meta"))
    with pytest.raises(RuntimeError, match="call the MultiTaskModel with"):
        small.base(x)


def test_foreign_task_refused_and_model_unchanged(small, tmp_path):
    snap = _snapshot(small)
    other = make_task(make_plain("test_resnet", seed=9), seed=1, classes=3)
    path = tmp_path / "other.safetensors"
    save_task(other, path)
    with pytest.raises(TaskFileError, match="different base model"):
        small.add_task("other", path)
    with pytest.raises(TaskFileError, match="different base"):
        small.add_task("other", other)
    vit = make_task(make_plain("test_vit"), seed=1, classes=3)
    with pytest.raises(TaskFileError, match="gated layers differ"):
        small.add_task("vit", vit)
    with pytest.raises(ValueError, match="exists already"):
        small.add_task("t0", path)
    with pytest.raises(ValueError, match="reserved"):
        small.add_task("base", path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(TaskFileError, match="pickle"):
        small.add_task("junk", tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="task file path or a converted nn.Module"):
        small.add_task("x", 3)
    _unchanged(small, snap)


@PATHS
def test_fallback_norms_groupnorm_model(cpu_chunk):
    """A model whose norms are not BatchNorm/LayerNorm (GroupNorm): served per task present."""
    arch = "test_efficientnet_gn"
    mt, tasks, base_oracle = build(arch, T=3, cpu_chunk=cpu_chunk)
    for m in [mt, base_oracle] + tasks:
        m.eval()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 2, 1])
    with torch.no_grad():
        out = mt(x, ids)
        rows = oracle_rows(x, ids, tasks, base_oracle)
    check_rows(out, rows, ids, tasks, base_oracle)


def test_cross_entropy_on_padded_logits_is_finite():
    mt, _, _ = build("test_resnet", T=2)
    mt.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out = mt(x, torch.tensor([0, 1, 0, 1]))
    loss = F.cross_entropy(out, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in mt.parameters() if p.grad is not None)


def assert_compiled_matches_eager(mt, x, ids):
    """torch.compile(fullgraph=True) of ``mt`` (eval, float32) traces and answers as eager."""
    with torch.no_grad():
        eager = mt(x, ids)
        compiled = torch.compile(mt, fullgraph=True)(x, ids)
    finite = torch.isfinite(eager)
    assert torch.equal(finite, torch.isfinite(compiled))
    assert_rel_close(compiled[finite], eager[finite], torch.float32, "compiled", bounds=RTOL_MODEL)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_torch_compile_fullgraph(arch):
    """The mixed batch traces without graph breaks (the ops are custom ops; the id range check
    and the CPU batch sort, which sync the host, are skipped while compiling), eval and train."""
    mt, _, _ = build(arch, T=3)
    mt = mt.float().eval()
    x = torch.randn(5, 3, SIZES[arch], SIZES[arch])
    ids = torch.tensor([2, -1, 0, 2, 1])
    assert_compiled_matches_eager(mt, x, ids)
    mt.train()
    out = torch.compile(mt, fullgraph=True)(x, ids)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1])).backward()
    layer = next(m for m in mt.modules() if hasattr(m, "slot"))
    assert layer.scores.grad is not None
