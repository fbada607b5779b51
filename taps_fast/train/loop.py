"""One training run of ``taps-fast train``: single task or joint, one process or torchrun's many.

Per optimizer step (``accum`` micro-batches): loss = cross-entropy (mean over the global batch)
+ the sparsity penalty once the penalty warm-up is over (TAPS phase only), backward (GradScaler
under fp16), optional gradient clipping over every trained tensor, then one step of the weights'
optimizer and one of the scores' (their own optimizer and lr, as the authors train them). Both lrs
follow ``schedule_factor`` over the run's steps. After ``epochs`` TAPS epochs the gates freeze
(``freeze_gates``: closed layers drop their deltas) and ``finetune_epochs`` train the open deltas.

Joint mode: one MultiTaskModel holds every task; the training order permutes the union of the
tasks' samples, so each batch mixes tasks in proportion to their sizes, and the model runs every
row through its own task. Its penalty is the mean over tasks of each task's λ·(1/L)·Σ|s|.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training import freeze_gates, penalty_of_scores, sparsity_penalty, summary
from . import data as D
from . import state as S
from .model import create_base, prepare, set_train_mode

log = logging.getLogger(__name__)

# Arguments that do not change what a run computes: a resumed run may differ in them.
NOT_IDENTITY = {"resume", "output", "workers", "stop_after", "progress", "log_level", "compile", "device"}


# -- distributed --------------------------------------------------------------------------------
def init_distributed(device_arg: str):
    """(rank, world, device) from torchrun's environment (gloo on the CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        import torch.distributed as dist

        if device_arg.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device, backend = torch.device(device_arg), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return rank, world, device
    return 0, 1, torch.device(device_arg)


def _all_sum(t: torch.Tensor, world: int) -> list:
    """``t`` summed over the processes, as floats (the one host sync)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


# -- the run --------------------------------------------------------------------------------------
class Run:
    def __init__(self, args) -> None:
        self.a = args
        self.rank, self.world, self.device = init_distributed(args.device)
        self.main = self.rank == 0
        self.joint = bool(args.joint)
        roots = args.joint if self.joint else [args.data]
        if not roots or roots == [None]:
            raise D.DataError("give the data folder (--data DIR) or several (--joint DIR1 DIR2 ...)")
        self.names = _task_names(roots)
        self.splits = [D.scan(r, args.train_split, args.val_split) for r in roots]
        self.out = args.resume or args.output
        if not self.out:
            raise ValueError("give the output folder (--output DIR) or the run to continue (--resume DIR)")
        self.amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    # model
    def _task_model(self, num_classes: int) -> nn.Module:
        a = self.a
        torch.manual_seed(a.seed)  # the fresh head's init depends on the seed alone
        m = create_base(a.model, num_classes, a.pretrained, a.pretrained_path, a.drop, a.drop_path)
        if self.joint:  # every task on the one base: its weights, whatever the init drew
            own = m.state_dict()
            m.load_state_dict({k: v for k, v in self.base_state.items() if k in own and own[k].shape == v.shape},
                              strict=False)
        return prepare(m, a.method, a.threshold, a.init_score, a.include, a.exclude)

    def build(self) -> None:
        a = self.a
        if self.joint:
            if a.method != "taps":
                raise ValueError("--joint trains TAPS tasks (--method taps)")
            from ..multitask import MultiTaskModel

            torch.manual_seed(a.seed)
            base = create_base(a.model, len(self.splits[0][0].classes), a.pretrained, a.pretrained_path)
            self.base_state = {k: v.clone() for k, v in base.state_dict().items()}
            self.model = MultiTaskModel(base, threshold=a.threshold, init_score=a.init_score,
                                        **({"include": a.include} if a.include else {}),
                                        **({"exclude": a.exclude} if a.exclude else {}))
            for name, (tr, _) in zip(self.names, self.splits):
                self.model.add_task(name, self._task_model(len(tr.classes)))
        else:
            self.model = self._task_model(len(self.splits[0][0].classes))
        self.model.to(self.device)
        if a.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _params(self):
        scores, decay, no_decay = [], [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if n.endswith("score") or n.endswith("scores"):
                scores.append(p)
            elif p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
        return scores, decay, no_decay

    def make_optimizers(self) -> None:
        a = self.a
        scores, decay, no_decay = self._params()
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if a.opt == "sgd":
            weights = torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum, nesterov=False)
        else:
            weights = torch.optim.AdamW(groups, lr=a.lr)
        self.optimizers = [weights]
        if scores:
            self.optimizers.append(torch.optim.SGD(scores, lr=a.score_lr, momentum=a.momentum, weight_decay=0.0)
                                   if a.score_opt == "sgd" else torch.optim.AdamW(scores, lr=a.score_lr,
                                                                                  weight_decay=0.0))
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def wrap(self) -> None:
        self.train_module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = [self.device.index] if self.device.type == "cuda" else None
            # Joint: the heads of tasks absent from a batch get no gradient.
            self.train_module = DDP(self.model, device_ids=dev, find_unused_parameters=self.joint)
        self.forward = torch.compile(self.train_module) if self.a.compile else self.train_module

    # data
    def make_data(self, model_for_cfg: nn.Module) -> None:
        a = self.a
        self.train_tf, self.eval_tf, self.data_cfg = D.transforms(model_for_cfg, a.img_size, not a.no_aug,
                                                                  a.hflip, a.scale, a.color_jitter)
        tr = [D.ImageDataset(t, self.train_tf, task=i, seed=a.seed) for i, (t, _) in enumerate(self.splits)]
        va = [D.ImageDataset(v, self.eval_tf, task=i, seed=a.seed) for i, (_, v) in enumerate(self.splits)]
        self.train_sets = tr
        self.train_data = torch.utils.data.ConcatDataset(tr)
        self.val_data = torch.utils.data.ConcatDataset(va)
        self.sampler = D.GlobalBatches(len(self.train_data), a.batch_size, a.seed, self.rank, self.world)
        self.val_sampler = D.GlobalBatches(len(self.val_data), a.batch_size, a.seed, self.rank, self.world,
                                           shuffle=False, drop_last=False)
        if len(self.sampler) == 0:
            raise D.DataError(f"the training split has {len(self.train_data)} images, fewer than one batch "
                              f"of {a.batch_size}")
        kw = dict(num_workers=a.workers, collate_fn=D.collate, pin_memory=self.device.type == "cuda",
                  persistent_workers=False)
        self.train_loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=self.sampler, **kw)
        self.val_loader = torch.utils.data.DataLoader(self.val_data, batch_sampler=self.val_sampler, **kw)

    # one step
    def _penalty(self):
        a = self.a
        if not self.joint:
            return sparsity_penalty(self.model, a.lam, a.penalty_norm)
        layers = list(self.model._layers().values())
        rows = torch.tensor(self.model._row_of, device=self.device)
        per_task = penalty_of_scores(torch.stack([m.scores[rows] for m in layers]),  # [L, T]
                                     [m.weight.numel() for m in layers], a.lam, a.penalty_norm)
        return per_task.mean()

    def _logits(self, x, t):
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            return self.forward(x, t) if self.joint else self.forward(x)

    def _set_lr(self) -> float:
        a = self.a
        f = S.schedule_factor(self.step, self.total_steps, self.warmup_steps, a.min_lr_ratio)
        for o, lrs in zip(self.optimizers, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f
        return f

    def train_epoch(self, epoch: int, phase: str) -> Dict[str, float]:
        a = self.a
        for ds in self.train_sets:
            ds.epoch = epoch
        self.sampler.epoch = epoch
        set_train_mode(self.model, a.method, True)
        penalise = phase == "taps" and a.method == "taps" and epoch >= a.penalty_warmup and a.lam > 0
        # loss·n, correct, n, penalty·steps, kept on the device: one host sync per epoch, not per step
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        micro = 0
        batches = self._progress(self.train_loader, f"epoch {epoch + 1} {phase}")
        per_rank = a.batch_size // self.world
        for x, y, t in batches:
            x, y, t = x.to(self.device, non_blocking=True), y.to(self.device), t.to(self.device)
            if a.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if micro == 0:
                lr_factor = self._set_lr()
            last_micro = micro == a.accum - 1
            sync = contextlib.nullcontext() if (last_micro or self.world == 1) else self.train_module.no_sync()
            with sync:
                logits = self._logits(x, t)
                # mean over the global batch: this rank's sum / (global batch); DDP averages over ranks
                ce = F.cross_entropy(logits.float(), y, reduction="sum") / per_rank
                loss = ce
                pen = None
                if penalise:
                    pen = self._penalty()
                    loss = loss + pen
                loss = loss / a.accum
                (self.scaler.scale(loss) if self.scaler.is_enabled() else loss).backward()
            with torch.no_grad():
                sums[0] += ce.detach() * len(y)
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += len(y)
                if pen is not None and last_micro:
                    sums[3] += pen.detach()
            micro += 1
            if last_micro:
                self._optimizer_step()
                micro = 0
                self.step += 1
        if micro:  # an epoch whose batches are not a multiple of accum: step on what is there
            self._optimizer_step()
            self.step += 1
        loss_n, correct, n, pen_sum = _all_sum(sums, self.world)
        steps = max(1, math.ceil(len(self.sampler) / a.accum))
        return {"train_loss": loss_n / max(1, n), "train_top1": correct / max(1, n),
                "penalty": pen_sum / self.world / steps, "lr": self.base_lrs[0][0] * lr_factor}

    def _optimizer_step(self) -> None:
        a = self.a
        if self.scaler.is_enabled():
            for o in self.optimizers:
                self.scaler.unscale_(o)
        if a.clip_grad:
            params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, a.clip_grad)
        for o in self.optimizers:
            if self.scaler.is_enabled():
                self.scaler.step(o)
            else:
                o.step()
        if self.scaler.is_enabled():
            self.scaler.update()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        return evaluate(self.model, self.val_loader, self.device, self.joint, len(self.names), self.world,
                        self.amp, self.a.channels_last, names=self.names, progress=self._progress)

    def _progress(self, it, desc):
        if not (self.main and self.a.progress):
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)

    # phases and files
    def enter_finetune(self) -> None:
        """Freeze the gates, then rebuild what held the dropped deltas (optimizers, DDP)."""
        if self.a.method == "taps":
            if self.joint:
                for m in self.model._layers().values():
                    m.scores.requires_grad_(False)
            else:
                freeze_gates(self.model)
        self.make_optimizers()
        self.wrap()

    def info(self, epoch: int, phase: str) -> Dict[str, Any]:
        return {"run_id": self.run_id, "epoch": epoch, "step": self.step, "phase": phase,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch}

    def task_files(self) -> Dict[str, str]:
        """Write the task file(s) of the final model; returns name -> path."""
        from ..checkpoint import save_task

        out = {}
        if self.joint:
            os.makedirs(os.path.join(self.out, "tasks"), exist_ok=True)
            for name, (tr, _) in zip(self.names, self.splits):
                p = os.path.join(self.out, "tasks", f"{name}.safetensors")
                self.model.save_task(name, p, labels=tr.classes)
                out[name] = p
        elif self.a.method == "taps":
            p = os.path.join(self.out, "task.safetensors")
            save_task(self.model, p, labels=self.splits[0][0].classes)
            out[self.names[0]] = p
        else:  # full fine-tuning / head-only: the whole model is the task
            from safetensors.torch import save_file

            p = os.path.join(self.out, "model.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, p)
            out[self.names[0]] = p
        return out


def _task_names(roots: List[str]) -> List[str]:
    names = []
    for r in roots:
        n = os.path.basename(os.path.normpath(r)) or "task"
        base, k = n, 2
        while n in names:
            n, k = f"{base}_{k}", k + 1
        names.append(n)
    return names


@torch.no_grad()
def evaluate(model, loader, device, joint: bool, n_tasks: int, world: int = 1, amp=None,
             channels_last: bool = False, names: Optional[List[str]] = None, progress=None) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy and mean cross-entropy per task (and their task mean)."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, n_tasks, dtype=torch.float64, device=device)  # per task: loss·n, top1, top5, n
    it = progress(loader, "eval") if progress else loader
    for x, y, t in it:
        x, y, t = x.to(device), y.to(device), t.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            logits = (model(x, t) if joint else model(x)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        per_sample = torch.stack([v.double() for v in (F.cross_entropy(logits, y, reduction="none"), top[:, 0] == y,
                                                       (top == y[:, None]).any(1), torch.ones_like(y))])
        sums.index_add_(1, t, per_sample)  # into each sample's task column, no host sync
    model.train(was)
    loss_n, top1, top5, count = _all_sum(sums, world)  # each [n_tasks]
    names = names or [str(i) for i in range(n_tasks)]
    per = {}
    for i, n in enumerate(names):
        cnt = max(1.0, count[i])
        per[n] = {"val_loss": loss_n[i] / cnt, "val_top1": top1[i] / cnt, "val_top5": top5[i] / cnt,
                  "val_images": int(count[i])}
    res: Dict[str, Any] = {k: sum(p[k] for p in per.values()) / len(per) for k in ("val_loss", "val_top1", "val_top5")}
    if len(per) > 1:
        res["tasks"] = per
    return res


def run(args) -> Dict[str, Any]:
    """Train as ``args`` (the parsed command line) says; returns the final metrics."""
    r = Run(args)
    a = r.a
    os.makedirs(r.out, exist_ok=True)
    resolved = dict(vars(a))
    meta = None
    if a.resume:
        meta, tensors = _check_resume(a, resolved)
        r.run_id = meta["run_id"]
    else:
        if os.path.exists(os.path.join(r.out, "last.json")):
            raise S.ResumeError(f"{r.out!r} already holds a run (last.json): continue it with --resume {r.out}, "
                                "or give another --output")
        r.run_id = uuid.uuid4().hex
    if r.main:
        _add_file_log(r.out)
    r.build()
    r.make_data(r.model.base if r.joint else r.model)
    r.scaler = torch.amp.GradScaler(r.device.type, enabled=r.amp is torch.float16)
    steps_per_epoch = math.ceil(len(r.sampler) / a.accum)
    r.total_steps = steps_per_epoch * (a.epochs + a.finetune_epochs)
    r.warmup_steps = steps_per_epoch * a.warmup_epochs
    r.step, r.best_top1, r.best_epoch = 0, -1.0, -1
    start = 0
    if meta is not None:
        start = meta["epoch"]
        saved = S.model_state(tensors)
        _, unexpected = r.model.load_state_dict(saved, strict=False)
        if meta["phase"] == "finetune":
            r.enter_finetune()  # the loaded scores decide which deltas freeze_gates drops
        else:
            r.make_optimizers()
            r.wrap()
        still = [k for k in r.model.state_dict() if k not in saved]
        if still or unexpected:
            raise S.ResumeError(f"the checkpoint in {r.out!r} does not fit this model: missing {still[:3]}, "
                                f"unexpected {list(unexpected)[:3]}")
        r.phase = meta["phase"]
        S.restore(meta, tensors, r.optimizers, r.scaler)
        r.step, r.best_top1, r.best_epoch = meta["step"], meta["best_top1"], meta["best_epoch"]
        log.info("resuming %s after epoch %d (step %d)", r.out, start, r.step)
    else:
        r.make_optimizers()
        r.wrap()
        r.phase = "taps"
        if r.main:
            with open(os.path.join(r.out, "args.json"), "w") as f:
                json.dump(dict(resolved, run_id=r.run_id, classes=[s[0].classes for s in r.splits],
                               tasks=r.names, data_config={k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in r.data_cfg.items()},
                               world_size=r.world), f, indent=1)
    total = a.epochs + a.finetune_epochs
    metrics: Dict[str, Any] = {}
    if start >= total:  # resumed after the last epoch: the run's files are already written
        log.info("%s: the run is complete (%d epochs); nothing to do", r.out, total)
        return meta.get("metrics", {}) if meta else {}
    ran = 0
    for epoch in range(start, total):
        if a.stop_after is not None and ran >= a.stop_after:
            log.info("stopping after %d epoch(s) as asked (--stop-after); continue with --resume %s", ran, r.out)
            break
        phase = "taps" if epoch < a.epochs else "finetune"
        if phase != r.phase:
            r.enter_finetune()
            r.phase = phase
        t0 = time.perf_counter()
        tm = r.train_epoch(epoch, phase)
        vm = r.evaluate()
        metrics = {"epoch": epoch + 1, "phase": phase, **tm, **vm, "time_s": time.perf_counter() - t0}
        if a.method == "taps" and not r.joint:
            totals = summary(r.model).totals
            metrics["task_fraction"], metrics["open_layers"] = totals["task_fraction"], totals["open_layers"]
        best = vm["val_top1"] > r.best_top1
        if best:
            r.best_top1, r.best_epoch = vm["val_top1"], epoch + 1
        if r.main:
            with open(os.path.join(r.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            info = r.info(epoch + 1, phase)
            S.save_checkpoint(r.out, "last", r.model, r.optimizers, r.scaler, info)
            if best:
                S.save_checkpoint(r.out, "best", r.model, r.optimizers, r.scaler, info)
            log.info("epoch %d/%d %s: train loss %.4f top-1 %.4f | val top-1 %.4f top-5 %.4f | %.1f s", epoch + 1,
                     total, phase, tm["train_loss"], tm["train_top1"], vm["val_top1"], vm["val_top5"],
                     metrics["time_s"])
        ran += 1
    else:
        if r.main:
            _finish(r, metrics)
    if r.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return metrics


def _finish(r: Run, metrics: Dict[str, Any]) -> None:
    from ..plot import plot_gate_map

    files = r.task_files()
    out: Dict[str, Any] = {"final": metrics, "best_top1": r.best_top1, "best_epoch": r.best_epoch,
                           "method": r.a.method, "files": files}
    if r.a.method == "taps":
        from ..checkpoint import load_task

        sums = {}
        for i, (name, path) in enumerate(files.items()):
            m = r._task_model(len(r.splits[i][0].classes))
            load_task(m, path)  # the written file, read back: the summary is of what ships
            sums[name] = summary(m)
        out["tasks"] = {n: s.to_dict() for n, s in sums.items()}
        try:
            plot_gate_map(sums, os.path.join(r.out, "gate_map.png"),
                          title=f"{r.a.model}: open layers per task (TAPS, λ={r.a.lam})")
        except ImportError as e:  # matplotlib is optional
            log.warning("no gate map: %s", e)
    else:  # the baselines: what they train is their task's size
        trained = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in r.model.parameters())
        out["totals"] = {"task_params": trained, "base_params": total, "task_fraction": trained / total}
    with open(os.path.join(r.out, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    log.info("wrote %s", ", ".join(files.values()))


def _check_resume(a, resolved: Dict[str, Any]):
    path = os.path.join(a.resume, "args.json")
    if not os.path.isfile(path):
        raise S.ResumeError(f"--resume {a.resume!r}: no args.json there (not a taps-fast train output folder)")
    with open(path) as f:
        stored = json.load(f)
    diff = [k for k in resolved if k not in NOT_IDENTITY and stored.get(k) != _jsonable(resolved[k])]
    if diff:
        raise S.ResumeError(f"--resume {a.resume!r} is another run: its arguments differ in "
                            + ", ".join(f"{k} ({stored.get(k)!r} there, {resolved[k]!r} here)" for k in diff))
    meta, tensors = S.read_checkpoint(a.resume, "last")
    if meta.get("run_id") != stored.get("run_id"):
        raise S.ResumeError(f"--resume {a.resume!r}: last.json belongs to run {meta.get('run_id')!r}, the folder's "
                            f"args.json to run {stored.get('run_id')!r}")
    return meta, tensors


def _jsonable(v):
    return json.loads(json.dumps(v))


def _add_file_log(folder: str) -> None:
    """The run's log also goes to ``folder/train.log`` (replacing an earlier run's file log)."""
    root = logging.getLogger("taps_fast")
    for old in [h for h in root.handlers if getattr(h, "_taps_train_log", False)]:
        root.removeHandler(old)
        old.close()
    h = logging.FileHandler(os.path.join(folder, "train.log"))
    h._taps_train_log = True
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
