"""Data-parallel TAPS training on 2 CPU processes (gloo) against one process trained on the whole
global batch: DDP (search phase, freeze_gates, re-wrap, frozen-gate phase), MultiTaskModel joint
training under DDP with mixed batches, and FSDP2 (fully_shard).

The test starts WORLD=2 copies of this file as worker processes (``python test_distributed.py
worker RANK RENDEZVOUS_FILE OUT_DIR``); a file:// rendezvous in the test's tmp dir needs no
port. Rank r trains on rows [r·B/2, (r+1)·B/2) of each global batch of B rows and writes what
it ended with (plain tensors) to OUT_DIR with torch.save; the test reads them with
weights_only=True and compares with the same training run here in one process on all B rows.

Why these runs agree: each rank's loss is a mean over B/2 rows and DDP / FSDP average the
gradients over the 2 ranks, so the averaged gradient is the mean over all B rows, the gradient
the single process takes (the sparsity penalty is the same on every rank, so its average is
itself). Only the summation order differs (two half sums, then the all-reduce's add, against one
sum over B rows).

float64, for two reasons. (1) The gate 1[s ≥ τ] is a step: in fp32 a score that the two runs
round differently (~1e-7 relative) could land on different sides of τ and the runs would part
for good; in float64 the scores differ by ~1e-16 and the test checks that no score comes within
MARGIN = 1e-6 of τ: every gate decision is the same in both runs with 1e10 to spare. (2) It lets
the bound be tight: BOUND = 1e-12 relative (max |a - e| / max |e| per tensor) after 9 SGD steps;
float64's unit roundoff is 1.1e-16, and the errors measured here are at most 1e-15.

Norms: GroupNorm and LayerNorm (per-sample statistics, so a half batch normalises each row as
the whole batch does). Train-mode BatchNorm would normalise by each rank's local-batch
statistics, which differ from the global batch's, so the runs would rightly differ;
SyncBatchNorm, which would fix that, raises "SyncBatchNorm expected input tensor to be on GPU or
XPU" for CPU tensors in this torch (2.14, torch/nn/modules/batchnorm.py), so it cannot be tested
here.

A hang (a rank waiting in a collective for a peer that never comes) fails the test: the process
group times out after PG_TIMEOUT_S and the test kills the workers after WALL_TIMEOUT_S.
"""
import copy
import datetime
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from taps_fast import MultiTaskModel, convert, freeze_gates, sparsity_penalty, taps_layers
from taps_fast.distributed import all_reduce_scores, score_params

from helpers import rel_err

WORLD = 2
B = 8  # global batch; each rank gets B // WORLD rows
SEARCH, FROZEN = 6, 3  # steps of the gate search, then of the frozen-gate phase
LAM, LR = 0.3, 0.1
# Scores at start: layer "0" near τ = 0.1 closes at the 2nd step, "3" at the 6th (the last of
# the search), "7" stays open. Values off the grid of the penalty's steps (λ·lr/L = 0.01), so
# that no score lands on τ (the closest comes within 1.7e-3).
INIT_SCORES = {"0": 0.1163, "3": 0.1537, "7": 0.5}
BOUND = 1e-12
MARGIN = 1e-6
PG_TIMEOUT_S = 30
WALL_TIMEOUT_S = 60


def _skip_reason():
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


# ----------------------------------------------------------------------------- the model and data
def plain(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3),
    ).double()


def tiny():
    """Three gated layers ("0", "3" conv, "7" linear), GroupNorm/LayerNorm, head "10"."""
    m = convert(plain(), head="10")
    with torch.no_grad():
        for name, layer in taps_layers(m):
            layer.score.fill_(INIT_SCORES[name])
    return m


def batch(step, rank, world, ids=None):
    """This rank's rows of the global batch of ``step`` (the same for every world size)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    return (x[rows], y[rows]) if ids is None else (x[rows], y[rows], ids[rows])


def sgd(model, **kw):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, **kw)


def full_state(model):
    """Every state_dict entry as a plain tensor (FSDP's sharded DTensors gathered: a collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the training runs
def _wrap(model, kind):
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Scores are 0-dim, which fully_shard refuses ("doesn't support scalar parameters"):
        # FSDP ignores them (not sharded, not reduced) and all_reduce_scores averages their grads.
        for _, layer in taps_layers(model):
            fully_shard(layer, ignored_params={layer.score})
        fully_shard(model, ignored_params=score_params(model))
    return model


def train_taps(kind, rank=0, world=1):
    """TAPS search (task loss + penalty) for SEARCH steps, freeze_gates, FROZEN more steps.
    kind: "single" (this process, every row), "ddp" or "fsdp" (this rank's rows)."""
    model = tiny()
    net, opt = _wrap(model, kind), sgd(model)
    gates, scores = [], []
    for step in range(SEARCH):
        x, y = batch(step, rank, world)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(net(x), y) + sparsity_penalty(model, LAM)).backward()
        if kind == "fsdp":
            all_reduce_scores(model)
        opt.step()
        gates.append([layer.is_open for _, layer in taps_layers(model)])
        scores.append([float(layer.score.detach()) for _, layer in taps_layers(model)])
    out = {}
    if kind == "ddp":  # a DDP wrapper is refused with a clear error (and left unchanged)
        try:
            freeze_gates(net)
        except TypeError as e:
            out["refused"] = torch.tensor("new DistributedDataParallel" in str(e))
    if kind == "fsdp":
        try:
            freeze_gates(model)
        except TypeError as e:
            out["refused"] = torch.tensor("sharded by FSDP" in str(e))
        fresh = tiny()  # the documented way: an unsharded copy, frozen, then sharded anew
        fresh.load_state_dict(full_state(model))
        model = fresh
    freeze_gates(model)
    net, opt = _wrap(model, kind), sgd(model)  # re-wrap, new optimizer: the deltas changed
    for step in range(SEARCH, SEARCH + FROZEN):
        x, y = batch(step, rank, world)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if kind == "fsdp":  # no score trains now: no collective, on every rank alike
            assert all_reduce_scores(model) == 0
        opt.step()
    out.update({f"param/{k}": v for k, v in full_state(model).items()})
    out["gates"] = torch.tensor(gates)
    out["scores"] = torch.tensor(scores, dtype=torch.float64)
    return out


def stale_ddp_check(rank, world):
    """What a DDP wrapper left stale by freeze_gates does (the reason for refuse_wrapped and the
    docs/training.md, "Re-wrap after freeze_gates"): its first step does not all-reduce (replicas diverge), the second
    raises. Returns flags for the test."""
    model = tiny()
    net, opt = _wrap(model, "ddp"), sgd(model)
    for step in range(SEARCH):  # layer "0" closes
        x, y = batch(step, rank, world)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(net(x), y) + sparsity_penalty(model, LAM)).backward()
        opt.step()
    freeze_gates(model)
    opt = sgd(model)
    x, y = batch(SEARCH, rank, world)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    d = model[7].delta.detach().clone()
    peers = [torch.empty_like(d) for _ in range(world)]
    dist.all_gather(peers, d)
    out = {"stale_diverged": torch.tensor(not torch.equal(peers[0], peers[1]))}
    try:
        net(x)
        out["stale_raised"] = torch.tensor(False)
    except RuntimeError as e:
        out["stale_raised"] = torch.tensor("Expected to have finished reduction" in str(e))
    return out


# MultiTaskModel: ids of each step's global batch (rank 0: rows 0-3, rank 1: rows 4-7).
# step 0: task 2 absent from both ranks, task 0 on rank 0 only, base rows on rank 1;
# step 1: every task present, none on both ranks; step 2: tasks 1 and 2 absent from both ranks;
# step 3: all tasks and a base row. No rank ever has only base rows (see docs/training.md).
MT_IDS = torch.tensor([[0, 0, 1, 1, 1, -1, 1, 1],
                       [2, 2, 2, -1, 0, 1, 0, 1],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [1, 2, 1, 2, 2, 2, 0, -1]])


def build_mt(cpu_chunk):
    """3 tasks on the tiny base; task 1 has layer "3" closed (no delta slot there), so a rank
    with only task 1's rows leaves that layer's stacks without a gradient on the chunk path."""
    base = plain()
    mt = MultiTaskModel(copy.deepcopy(base), cpu_chunk=cpu_chunk, head="10")
    g = torch.Generator().manual_seed(5)
    for t in range(3):
        task = convert(copy.deepcopy(base), head="10")
        with torch.no_grad():
            for name, layer in taps_layers(task):
                layer.score.fill_(0.05 if (t, name) == (1, "3") else 0.2)
                layer.delta.copy_(torch.randn(layer.delta.shape, generator=g, dtype=torch.float64) * 0.05)
            task[10].weight.copy_(torch.randn(task[10].weight.shape, generator=g, dtype=torch.float64))
        mt.add_task(f"t{t}", task)
    return mt.train()


def train_mt(kind, rank=0, world=1, cpu_chunk=8, find_unused=True):
    """Joint training of the 3 tasks on the MT_IDS batches; SGD with momentum and weight decay,
    so a parameter given a zero gradient moves while one given None does not: the runs agree
    only if DDP leaves the gradients of tasks absent from the global batch as the single process
    does."""
    mt = build_mt(cpu_chunk)
    net = nn.parallel.DistributedDataParallel(mt, find_unused_parameters=find_unused) if kind == "ddp" else mt
    opt = sgd(mt, momentum=0.9, weight_decay=0.01)
    for step in range(len(MT_IDS)):
        x, y, ids = batch(step, rank, world, MT_IDS[step])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, ids), y).backward()
        opt.step()
    return {f"param/{k}": v for k, v in full_state(mt).items()}


def mt_without_find_unused(rank, world):
    """The chunk path with find_unused_parameters=False: step 0 leaves task 2's head without a
    gradient, so DDP's reducer cannot finish, and the next forward raises."""
    mt = build_mt(cpu_chunk=8)
    net = nn.parallel.DistributedDataParallel(mt)
    x, y, ids = batch(0, rank, world, MT_IDS[0])
    F.cross_entropy(net(x, ids), y).backward()
    try:
        net(x, ids)
    except RuntimeError as e:
        return {"raised": torch.tensor("Expected to have finished reduction" in str(e))}
    return {"raised": torch.tensor(False)}


def fsdp2_missing():
    """Why FSDP2 cannot run here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.fsdp.fully_shard is not available: {e}"
    return None


def run_all(rank, world):
    """Every distributed run, in one pair of processes: starting one costs ~5 s of imports
    (torch, and torch._dynamo, which DDP imports) per process against <1 s of training."""
    out = {f"ddp/{k}": v for k, v in train_taps("ddp", rank, world).items()}
    out.update({f"ddp/check/{k}": v for k, v in stale_ddp_check(rank, world).items()})
    out.update({f"mt_chunks/{k}": v for k, v in train_mt("ddp", rank, world, cpu_chunk=8).items()})
    mixed = train_mt("ddp", rank, world, cpu_chunk=0, find_unused=False)
    out.update({f"mt_mixed/{k}": v for k, v in mixed.items()})
    out.update({f"mt_check/{k}": v for k, v in mt_without_find_unused(rank, world).items()})
    if fsdp2_missing() is None:
        out.update({f"fsdp/{k}": v for k, v in train_taps("fsdp", rank, world).items()})
    return out


# ----------------------------------------------------------------------------- launching
def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        torch.save(run_all(rank, WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def start(tmp_path):
    """Start the WORLD worker processes (they run run_all); ``finish`` collects them."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]  # tests/: helpers.py
                                          + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(r),
                              str(tmp_path / "rendezvous"), str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(WORLD)]


def finish(procs, tmp_path, t0):
    """Each rank's results; a worker still running WALL_TIMEOUT_S after t0 fails the test."""
    logs = []
    try:
        for r, p in enumerate(procs):
            try:
                logs.append(p.communicate(timeout=max(1.0, t0 + WALL_TIMEOUT_S - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} still running after {WALL_TIMEOUT_S} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-3000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def part(results, prefix):
    return {k[len(prefix) + 1:]: v for k, v in results.items() if k.startswith(prefix + "/")}


def assert_same_training(got, ref, what):
    assert sorted(got) == sorted(ref), f"{what}: keys differ: {sorted(set(got) ^ set(ref))}"
    for k, e in ref.items():
        a = got[k]
        assert a.shape == e.shape and a.dtype == e.dtype, (what, k, a.shape, e.shape, a.dtype, e.dtype)
        if e.numel() == 0:  # a free row's placeholder head (nn.Linear(in, 0))
            continue
        if not e.is_floating_point():
            assert torch.equal(a, e), f"{what}: {k} differs"
        else:
            err = rel_err(a, e) if e.abs().max() > 0 else float(a.abs().max())
            assert err <= BOUND, f"{what}: {k}: relative error {err:.3g} > {BOUND:g}"


def check_taps_run(ranks, ref, kind):
    # The premise: a gate closes mid-run, another stays open, and no score comes near τ.
    gates, scores = ref["gates"], ref["scores"]
    assert gates[0].all() and not gates[-1].all() and gates[-1].any(), gates
    assert (scores - 0.1).abs().min() > MARGIN, scores
    assert "param/0.delta" not in ref and "param/7.delta" in ref  # freeze_gates dropped "0"
    for r, got in enumerate(ranks):
        checks = {k: v for k, v in got.items() if k in ("refused",) or k.startswith("check/")}
        assert_same_training({k: v for k, v in got.items() if k not in checks}, ref, f"{kind} rank {r}")
        assert bool(checks.pop("refused", False)), f"{kind} rank {r}: freeze_gates did not refuse clearly"
        for k, v in checks.items():
            assert bool(v), f"{kind} rank {r}: {k}"


def check_multitask(ranks, refs):
    for r, got in enumerate(ranks):
        for path, ref in refs.items():
            assert_same_training(part(got, f"mt_{path}"), ref, f"MultiTaskModel {path} rank {r}")
        assert bool(got["mt_check/raised"]), f"rank {r}: DDP without find_unused_parameters did not raise"
    # Task 2 is absent from step 2's global batch: on the chunk path its head keeps a None
    # gradient (SGD skips it), on the mixed path it gets a zero one (momentum and weight decay
    # move it). So the comparisons above tell a DDP that zero-fills unused gradients apart.
    head2 = "param/base.10.tasks.2.weight"
    assert not torch.allclose(refs["chunks"][head2], refs["mixed"][head2], rtol=0, atol=1e-9)


def test_distributed_training_matches_one_process(tmp_path):
    """2 gloo ranks, each on half of every global batch, against one process on all of it (one
    test, so that the workers start once: see run_all):

    - DDP with find_unused_parameters=False through the gate search (closed layers' deltas get
      an explicit zero gradient), then freeze_gates on the inner model, a new DDP wrapper and a
      new optimizer: every parameter, score and gate as in one process. freeze_gates refuses
      the wrapper itself; a wrapper left stale diverges silently for a step, then raises.
    - MultiTaskModel joint training, tasks missing from a rank or from both: the CPU chunk path
      (default) needs find_unused_parameters=True (absent tasks' heads and stacks get no
      gradient; without it DDP raises); the mixed-batch path (cpu_chunk=0, the GPU's) gives
      every stack and nn.Linear head a gradient and runs with find_unused_parameters=False.
    - FSDP2: every TAPS layer and the root fully_shard-ed, 0-dim scores ignored and averaged by
      all_reduce_scores, frozen base weights (requires_grad=False) sharded with the trainable
      deltas; freeze_gates refuses the sharded model and is applied to an unsharded copy
      (gathered full state dict), which is then sharded anew.
    """
    t0 = time.monotonic()
    procs = start(tmp_path)
    try:  # the single-process references, while the workers run
        ref = train_taps("single")
        mt_refs = {"chunks": train_mt("single", cpu_chunk=8), "mixed": train_mt("single", cpu_chunk=0)}
    except BaseException:
        for p in procs:
            p.kill()
        raise
    ranks = finish(procs, tmp_path, t0)
    check_taps_run([part(got, "ddp") for got in ranks], ref, "ddp")
    check_multitask(ranks, mt_refs)
    why = fsdp2_missing()
    if why is not None:
        pytest.skip(f"DDP and MultiTaskModel checks passed; FSDP2 not tested: {why}")
    check_taps_run([part(got, "fsdp") for got in ranks], ref, "fsdp")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
