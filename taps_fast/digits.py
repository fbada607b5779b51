"""The building blocks of the digits demo (taps_fast.demo): the data and its tasks, the small
CNN, the run's configuration, the training stages (pretraining, full fine-tuning, head-only,
TAPS) and the serving check of a MultiTaskModel against each task's own model. Public for
``examples/`` (also as taps_fast.demo.*); ``python -m taps_fast.demo`` runs them end to end."""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import taps_fast

log = logging.getLogger("taps_fast.demo")


HEAD = "head"  # the classifier's module name: convert(model, head=HEAD) leaves it a plain Linear
# conv1..conv4 output channels: 288 + 3 × 9216 conv weights, so conv2-4 each hold a third of what
# the gates choose from and the choice shows in the parameter count (at 16-32-32-64, conv4 alone
# was 56% of the model and every task kept it open).
WIDTHS = (32, 32, 32, 32)
POOL_AFTER = (2, 4)  # 8×8 -> 4×4 -> 2×2


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    """The one train/test split of the digits: images [N, 1, 8, 8] in [0, 1], labels 0..9, and
    the indices into ``load_digits()`` of each side."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    idx_train: Tensor
    idx_test: Tensor


@dataclass(frozen=True)
class Task:
    """A classification task on the digit images: which digits' images it uses, how the images
    are transformed and how the digit becomes the task's label."""

    name: str
    num_classes: int
    digits: Tuple[int, ...]
    transform: Callable[[Tensor], Tensor]
    relabel: Callable[[Tensor], Tensor]
    description: str = ""


@dataclass(frozen=True)
class TaskData:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _same(t: Tensor) -> Tensor:
    return t


ALL = tuple(range(10))
PRETRAIN = Task("digits 0-4", 5, (0, 1, 2, 3, 4), _same, _same, "pretraining: digits 0-4, 5-way")
TASKS: Tuple[Task, ...] = (
    Task("digits 5-9", 5, (5, 6, 7, 8, 9), _same, lambda y: y - 5, "new classes, 5-way"),
    Task("mirrored", 10, ALL, lambda x: x.flip(-1), _same, "images flipped left-right, 10-way"),
    Task("inverted", 10, ALL, lambda x: 1.0 - x, _same, "1 - x (white on black), 10-way"),
    Task("parity", 2, ALL, _same, lambda y: y % 2, "even / odd of all digits, 2-way"),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}


def load_split(seed: int = 0, test_size: float = 0.3) -> Split:
    """scikit-learn's digits, scaled from 0..16 to [0, 1], split once: stratified by digit,
    ``test_size`` of every digit's images in the test split (seeded)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the taps_fast demo needs scikit-learn for its data (the digits ship inside "
                          "the package, nothing is downloaded): pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(list(range(len(y))), test_size=test_size, stratify=d.target,
                                      random_state=seed)
    itr, ite = torch.tensor(sorted(idx_tr)), torch.tensor(sorted(idx_te))
    return Split(x[itr], y[itr], x[ite], y[ite], itr, ite)


def task_data(split: Split, task: Task) -> TaskData:
    """The task's train and test sets: the split's images of ``task.digits``, transformed and
    relabelled (train from the train split only, test from the test split only)."""
    digits = torch.tensor(task.digits)
    a, b = torch.isin(split.y_train, digits), torch.isin(split.y_test, digits)
    return TaskData(task.transform(split.x_train[a]), task.relabel(split.y_train[a]),
                    task.transform(split.x_test[b]), task.relabel(split.y_test[b]))


# ----------------------------------------------------------------------------- model
def build_model(num_classes: int, widths: Sequence[int] = WIDTHS) -> nn.Sequential:
    """A small CNN for 8×8 images: len(widths) × (conv 3×3, BatchNorm, ReLU) with a 2×2 max-pool
    after the convs listed in :data:`POOL_AFTER`, global average pooling and a Linear classifier
    named :data:`HEAD` (last)."""
    layers: List[Tuple[str, nn.Module]] = []
    for i, (cin, cout) in enumerate(zip((1,) + tuple(widths[:-1]), widths), 1):
        # no conv bias: the BatchNorm after it has one
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU())]
        if i in POOL_AFTER:
            layers.append((f"pool{POOL_AFTER.index(i) + 1}", nn.MaxPool2d(2)))
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               (HEAD, nn.Linear(widths[-1], num_classes))]
    return nn.Sequential(OrderedDict(layers))


def with_new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A deep copy of ``model`` with a freshly initialised (seeded) :data:`HEAD` of
    ``num_classes`` outputs."""
    new = copy.deepcopy(model)
    old = new.get_submodule(HEAD)
    torch.manual_seed(seed)
    setattr(new, HEAD, nn.Linear(old.in_features, num_classes))
    return new


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- config
@dataclass
class DemoConfig:
    """Every knob of the demo (epochs are per stage; :meth:`scaled` multiplies them)."""

    seed: int = 0
    test_size: float = 0.3
    batch_size: int = 64
    # Adam: pretraining, full fine-tuning, every phase of TAPS (deltas / norms / head). 1e-3 was
    # too slow for TAPS runs whose gates all closed early: parity λ = 2 reached 89.1% and
    # mirrored λ = 4 67.0% (3e-3: 94.8% and 82.0%; head-only 90.4% and 83.3%).
    lr: float = 3e-3
    head_lr: float = 1e-2  # Adam, head-only (a linear probe on frozen features)
    # The scores train with plain SGD, not Adam: Adam divides each step by the gradient's RMS,
    # so a score would move by about its learning rate per step whatever λ is, and λ would no
    # longer set the trade-off. With SGD the penalty alone moves a score by score_lr·λ/L per step:
    # 0.01·1/4 = 0.0025, so a layer the task does not pull on closes (0.15 -> τ = 0.1) in 20
    # steps, one epoch of a 10-way task; a layer stays open while the task pulls harder than λ/L.
    # Measured at λ = 1 over the 4 tasks (16 gates): score_lr 1e-3 closed none, 3e-3 closed 5,
    # 1e-2 closed 10 (test accuracy 98.1-99.6%), 3e-2 closed 7 (parity all: 92.6%).
    score_lr: float = 1e-2
    lam: float = 1.0
    pretrain_epochs: int = 10
    ft_epochs: int = 6
    head_epochs: int = 30  # on cached features: ~1 ms an epoch
    warmup_epochs: int = 2  # TAPS: no penalty while the deltas grow from zero
    penalty_epochs: int = 6
    frozen_epochs: int = 4
    sweep_lams: Tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    sweep_tasks: Tuple[str, ...] = ("mirrored", "parity")

    def scaled(self, s: float) -> "DemoConfig":
        """The same run with every epoch count multiplied by ``s`` (at least 1 each)."""
        ep = {k: max(1, round(getattr(self, k) * s)) for k in
              ("pretrain_epochs", "ft_epochs", "head_epochs", "warmup_epochs", "penalty_epochs", "frozen_epochs")}
        return replace(self, **ep)

    def taps_epochs(self) -> int:
        return self.warmup_epochs + self.penalty_epochs + self.frozen_epochs


def quick_config(seed: int = 0) -> DemoConfig:
    """The reduced run of ``--quick`` (the test): a third of the epochs, a 3-point sweep on one task;
    pretraining (0.1 s an epoch) keeps 6 epochs: at 3 the base reached only 77% on digits 0-4."""
    return replace(DemoConfig(seed=seed).scaled(0.34), pretrain_epochs=6, sweep_lams=(0.0, 1.0, 4.0),
                   sweep_tasks=("parity",))


def _stage_seed(seed: int, *keys: str) -> int:
    """A seed per stage, so that each stage's result does not depend on which stages ran before."""
    return (seed * 1_000_003 + zlib.crc32("/".join(keys).encode())) % (2**31)


# ----------------------------------------------------------------------------- training
class Progress:
    """A tqdm bar over all epochs of the run (stderr; ``disable=True`` for none); head-only
    training (milliseconds an epoch) counts as one."""

    def __init__(self, total: int, disable: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=disable, file=sys.stderr, unit="epoch", dynamic_ncols=True,
                        leave=False)

    def stage(self, name: str) -> None:
        self.bar.set_description(name, refresh=False)
        self.bar.set_postfix_str("")

    def epoch(self, **postfix) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


def train_epochs(model: nn.Module, x: Tensor, y: Tensor, epochs: int, optimizers: Sequence[torch.optim.Optimizer],
                 *, batch_size: int, seed: int, penalty: Optional[Callable[[], Tensor]] = None,
                 anneal: bool = False, progress: Optional[Progress] = None) -> float:
    """``epochs`` passes over (x, y) in shuffled mini-batches (seeded), train mode, loss =
    cross-entropy (+ ``penalty()``); every optimizer steps on every batch. ``anneal``: the
    learning rates fall linearly to 0 over these epochs, lr·(1 - step/steps), so that training
    ends at a settled point (measured with 16-32-32-64 widths, TAPS on parity at λ = 0, 3 seeds ×
    3 settings: at a constant Adam rate 2 of the 9 runs ended at 91.9% and 94.3% test accuracy,
    the others at 98.0-99.4%; annealed, all 9 at 98.7-99.3%). Returns the last epoch's mean loss."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    steps = epochs * math.ceil(len(y) / batch_size)
    scheds = ([torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 - k / steps) for o in optimizers]
              if anneal and steps else [])
    mean = float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            if penalty is not None:
                loss = loss + penalty()
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optimizers:
                o.step()
            for sc in scheds:
                sc.step()
            total += float(loss.detach()) * len(b)
            n += len(b)
        mean = total / n
        if progress is not None:
            progress.epoch(loss=f"{mean:.3f}")
    return mean


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of ``model`` in eval mode."""
    model.eval()
    return model(x)


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    return float((predict(model, x).argmax(-1) == y).float().mean())


def pretrain(split: Split, cfg: DemoConfig, progress: Optional[Progress] = None) -> Tuple[nn.Module, float]:
    """The base model: :func:`build_model` trained from scratch on the train images of digits
    0-4 (Adam). Returns (model, test accuracy on digits 0-4)."""
    data = task_data(split, PRETRAIN)
    torch.manual_seed(_stage_seed(cfg.seed, "pretrain"))
    model = build_model(PRETRAIN.num_classes)
    if progress:
        progress.stage("pretrain digits 0-4")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_epochs(model, data.x_train, data.y_train, cfg.pretrain_epochs, [opt], batch_size=cfg.batch_size,
                 seed=_stage_seed(cfg.seed, "pretrain", "batches"), anneal=True, progress=progress)
    return model, evaluate(model, data.x_test, data.y_test)


def _result(model: nn.Module, data: TaskData, task_params: int, base_params: int, **extra) -> dict:
    return {"accuracy": evaluate(model, data.x_test, data.y_test), "task_params": int(task_params),
            "base_params": int(base_params), "task_fraction": task_params / base_params, **extra}


def finetune_full(base: nn.Module, task: Task, data: TaskData, cfg: DemoConfig,
                  progress: Optional[Progress] = None) -> Tuple[nn.Module, dict]:
    """Full fine-tuning: every parameter of a copy of ``base`` (fresh head) trains. A task must
    store the whole model: task_params = all its parameters (100% of the base)."""
    model = with_new_head(base, task.num_classes, _stage_seed(cfg.seed, task.name, "head"))
    if progress:
        progress.stage(f"{task.name}: full FT")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_epochs(model, data.x_train, data.y_train, cfg.ft_epochs, [opt], batch_size=cfg.batch_size,
                 seed=_stage_seed(cfg.seed, task.name, "ft"), anneal=True, progress=progress)
    n = count_params(model)
    return model, _result(model, data, n, n)


def finetune_head(base: nn.Module, task: Task, data: TaskData, cfg: DemoConfig,
                  progress: Optional[Progress] = None) -> Tuple[nn.Module, dict]:
    """Head-only: the copy's features are frozen (BatchNorm in eval mode: the base's running
    statistics), only the fresh head trains. The features do not change, so they are computed
    once and the head is trained on them (a linear probe: the same result as running the model,
    at ~1 ms an epoch). task_params = the head's parameters."""
    model = with_new_head(base, task.num_classes, _stage_seed(cfg.seed, task.name, "head"))
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_submodule(HEAD)
    for p in head.parameters():
        p.requires_grad_(True)
    if progress:
        progress.stage(f"{task.name}: head only")
    features = predict(model[:-1], data.x_train)  # build_model's head is its last module
    opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    train_epochs(head, features, data.y_train, cfg.head_epochs, [opt], batch_size=cfg.batch_size,
                 seed=_stage_seed(cfg.seed, task.name, "head-only"), anneal=True)
    if progress:
        progress.epoch()
    return model, _result(model, data, count_params(head), count_params(model))


def train_taps(base: nn.Module, task: Task, data: TaskData, cfg: DemoConfig, lam: Optional[float] = None,
               progress: Optional[Progress] = None) -> Tuple[nn.Module, dict]:
    """TAPS on a copy of ``base`` with a fresh head:

    1. ``taps_fast.convert(model, head=HEAD)``: every conv gets a zero delta and a score 0.15
       (gate open, τ = 0.1); the base weights freeze; BatchNorm and head stay trainable.
    2. ``warmup_epochs`` of task loss alone, then ``penalty_epochs`` of task loss +
       ``sparsity_penalty(model, lam)`` = λ·(1/L)·Σ|s_i|. Deltas, norms and head: Adam; scores: SGD
       (see :class:`DemoConfig`).
    3. ``freeze_gates``: the gates are fixed, closed deltas dropped; ``frozen_epochs`` of fine-tuning
       the open deltas, norms and head with a new optimizer.

    task_params from ``taps_fast.summary``: open deltas + norms + head + one score per layer.
    """
    lam = cfg.lam if lam is None else lam
    model = taps_fast.convert(with_new_head(base, task.num_classes, _stage_seed(cfg.seed, task.name, "head")),
                              head=HEAD)
    scores = [m.score for _, m in taps_fast.taps_layers(model)]
    ids = {id(s) for s in scores}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opts = [torch.optim.Adam(rest, lr=cfg.lr), torch.optim.SGD(scores, lr=cfg.score_lr)]
    kw = dict(batch_size=cfg.batch_size, progress=progress)
    if progress:
        progress.stage(f"{task.name}: TAPS λ={lam:g}")
    train_epochs(model, data.x_train, data.y_train, cfg.warmup_epochs, opts,
                 seed=_stage_seed(cfg.seed, task.name, "taps-warmup"), **kw)
    train_epochs(model, data.x_train, data.y_train, cfg.penalty_epochs, opts,
                 penalty=lambda: taps_fast.sparsity_penalty(model, lam),
                 seed=_stage_seed(cfg.seed, task.name, "taps-penalty", str(lam)), **kw)
    gates = taps_fast.freeze_gates(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    train_epochs(model, data.x_train, data.y_train, cfg.frozen_epochs, [opt],
                 seed=_stage_seed(cfg.seed, task.name, "taps-frozen", str(lam)), anneal=True, **kw)
    s = taps_fast.summary(model)
    t = s.totals
    return model, _result(model, data, t["task_params"], t["base_params"], lam=lam,
                          open_layers=[r.name for r in s.rows if r.open], gates=gates, summary=s.to_dict())


# ----------------------------------------------------------------------------- serving
def _file_name(task_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in task_name) + ".safetensors"


def save_base(model: nn.Module, path: str) -> int:
    """The base model's state (parameters and buffers) as a safetensors file; returns its size."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def serve_check(pretrained: nn.Module, task_models: Dict[str, nn.Module], inputs: Dict[str, Tensor],
                out_dir: str, base_inputs: Optional[Tensor] = None) -> dict:
    """Serve every task from one base in ONE mixed batch and check it against the task models.

    Each task model is saved with ``taps_fast.save_task`` to ``out_dir/tasks/<task>.safetensors``
    and added to ``MultiTaskModel(copy of pretrained)`` from that file. The batch interleaves the
    rows of all tasks (round robin over ``inputs[task]``; ``base_inputs`` rows run the base as
    task -1); heads of different widths are padded with -inf. Every row's argmax must equal its
    task model's (run alone, eval mode) on the same input, on the CPU's default path (task-pure
    chunks) and in one call (``cpu_chunk = 0``: the mixed-batch ops). Returns the sizes, the max
    |logit difference| over the real (finite) columns, and ``predictions_equal`` (both paths).
    """
    tdir = os.path.join(out_dir, "tasks")
    os.makedirs(tdir, exist_ok=True)
    mt = taps_fast.MultiTaskModel(copy.deepcopy(pretrained), head=HEAD)
    files, sizes = {}, {}
    for name, model in task_models.items():
        path = os.path.join(tdir, _file_name(name))
        sizes[name] = taps_fast.save_task(model, path)
        files[name] = path
        mt.add_task(name, path)
    base_bytes = save_base(pretrained, os.path.join(out_dir, "base.safetensors"))
    mt.eval()

    # rows interleaved: task 0 row 0, task 1 row 0, ..., task 0 row 1, ...
    groups = [(mt.task_index(n), x, task_models[n]) for n, x in inputs.items()]
    if base_inputs is not None:
        groups.append((-1, base_inputs, pretrained))
    order = sorted(((i, g) for g, (_, x, _) in enumerate(groups) for i in range(len(x))))
    x = torch.stack([groups[g][1][i] for i, g in order])
    ids = torch.tensor([groups[g][0] for _, g in order], dtype=torch.int64)
    alone = {g: predict(model, xs) for g, (_, xs, model) in enumerate(groups)}
    rows = {g: torch.tensor([k for k, (_, gg) in enumerate(order) if gg == g]) for g in range(len(groups))}

    def compare(mixed: Tensor) -> Dict[str, dict]:
        per_task = {}
        for g, (tid, _, _) in enumerate(groups):
            ref = alone[g]
            c = ref.shape[-1]
            got = mixed[rows[g]]
            pad_ok = bool(torch.isneginf(got[:, c:]).all())
            per_task["base" if tid < 0 else mt.tasks[tid]] = {
                "rows": len(rows[g]), "classes": c, "padding_is_-inf": pad_ok,
                "predictions_equal": bool((got[:, :c].argmax(-1) == ref.argmax(-1)).all()) and pad_ok,
                "max_abs_logit_diff": float((got[:, :c] - ref).abs().max())}
        return per_task

    # The CPU default runs the batch as task-pure chunks of mt.cpu_chunk rows (faster here);
    # cpu_chunk = 0 runs it in one call through the mixed-batch ops, the path a GPU takes.
    with torch.no_grad():
        t0 = time.perf_counter()
        mixed = mt(x, ids)
        mixed_s = time.perf_counter() - t0
        chunk, mt.cpu_chunk = mt.cpu_chunk, 0
        one_call = compare(mt(x, ids))
        mt.cpu_chunk = chunk
    per_task = compare(mixed)
    for name, t in per_task.items():
        t.update(task_file=files.get(name), file_bytes=sizes.get(name))
    ok = all(t["predictions_equal"] for t in list(per_task.values()) + list(one_call.values()))
    return {"batch_rows": int(x.shape[0]), "logits_shape": list(mixed.shape), "tasks": per_task,
            "predictions_equal": ok, "max_abs_logit_diff": max(t["max_abs_logit_diff"] for t in per_task.values()),
            "one_call": {"predictions_equal": all(t["predictions_equal"] for t in one_call.values()),
                         "max_abs_logit_diff": max(t["max_abs_logit_diff"] for t in one_call.values()),
                         "tasks": one_call},
            "mixed_batch_s": mixed_s, "base_file": os.path.join(out_dir, "base.safetensors"),
            "base_file_bytes": base_bytes, "task_file_bytes": sizes, "multitask_weight_bytes": mt.weight_bytes()}
