"""Training checkpoints: ``<tag>.safetensors`` (every tensor: model, optimizer states, RNG) and
``<tag>.json`` (everything else: run id, epoch, step, phase, optimizer hyper-parameters, scaler,
Python and NumPy RNG states). Nothing is unpickled on load.

The learning-rate schedule is a pure function of the optimizer step (``schedule_factor``), so the
step counter is the scheduler's whole state.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

FORMAT = "taps_fast.train.checkpoint/1"


class ResumeError(ValueError):
    """A ``--resume`` folder that this command cannot continue (another run, or no checkpoint)."""


def schedule_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """lr / base lr at optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps
    from 1/warmup, then a cosine from 1 down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _split_optimizer(i: int, sd: Dict[str, Any], tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    state = {}
    for pid, entry in sd["state"].items():
        plain = {}
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"optim{i}/{pid}/{k}"] = v.detach().cpu().clone().contiguous()
            else:
                plain[k] = v
        state[str(pid)] = plain
    return {"state": state, "param_groups": sd["param_groups"]}


def _join_optimizer(i: int, meta: Dict[str, Any], tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(plain) for pid, plain in meta["state"].items()}
    prefix = f"optim{i}/"
    for k, v in tensors.items():
        if k.startswith(prefix):
            pid, name = k[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: str, tag: str, model: torch.nn.Module, optimizers: List[torch.optim.Optimizer],
                    scaler: Optional[torch.amp.GradScaler], info: Dict[str, Any]) -> str:
    """Write ``folder/<tag>.safetensors`` and ``folder/<tag>.json`` (the JSON last, each through a
    temporary file and a rename, so a crash mid-write leaves the previous checkpoint whole)."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
               if isinstance(v, Tensor)}
    opt_meta = [_split_optimizer(i, o.state_dict(), tensors) for i, o in enumerate(optimizers)]
    tensors["rng/torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    meta = dict(info, format=FORMAT, optimizers=opt_meta,
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                rng={"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                               float(np_state[4])]})
    st = os.path.join(folder, f"{tag}.safetensors")
    js = os.path.join(folder, f"{tag}.json")
    save_file(tensors, st + ".tmp")
    os.replace(st + ".tmp", st)
    with open(js + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(js + ".tmp", js)
    return st


def read_checkpoint(folder: str, tag: str):
    """(meta, tensors) of a checkpoint written by ``save_checkpoint``; ResumeError when absent or
    not one."""
    from safetensors.torch import load_file

    js, st = os.path.join(folder, f"{tag}.json"), os.path.join(folder, f"{tag}.safetensors")
    if not (os.path.isfile(js) and os.path.isfile(st)):
        raise ResumeError(f"{folder!r} holds no {tag!r} checkpoint ({tag}.json and {tag}.safetensors)")
    try:
        with open(js) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ResumeError(f"{js!r} is not a readable checkpoint: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResumeError(f"{js!r} is not a taps_fast training checkpoint (format {FORMAT!r})")
    return meta, load_file(st)


def restore(meta: Dict[str, Any], tensors: Dict[str, Tensor], optimizers: List[torch.optim.Optimizer],
            scaler: Optional[torch.amp.GradScaler]) -> None:
    """Optimizer, scaler and RNG states from a checkpoint (the model is loaded by the caller)."""
    if len(meta["optimizers"]) != len(optimizers):
        raise ResumeError(f"the checkpoint has {len(meta['optimizers'])} optimizers, this run {len(optimizers)}")
    for i, o in enumerate(optimizers):
        o.load_state_dict(_join_optimizer(i, meta["optimizers"][i], tensors))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["rng"]["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng/torch"])


def model_state(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
