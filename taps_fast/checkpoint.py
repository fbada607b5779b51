"""Task checkpoints: a task as a small safetensors file of just what it adds to the base.

File layout (safetensors, so loading can never run code; nothing here unpickles):

    score/<layer>   every gated layer's score (0-dim)
    delta/<layer>   the delta of each layer whose gate is open (closed deltas are not stored)
    state/<key>     norm layers' parameters and buffers, the head, and any other parameter the
                    user left trainable (state_dict keys)

    metadata: format, format_version, taps_fast_version, base_fingerprint (SHA-256 of the gated
    layers' base weights), thresholds (JSON, per layer), checksum (SHA-256 of every tensor's
    name, dtype, shape and bytes, in key order: catches corrupted bytes, which safetensors'
    own header checks cannot).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Iterable, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._version import __version__
from .convert import taps_layers, task_state_keys
from .ops._common import gate_is_open

FORMAT = "taps_fast.task"
FORMAT_VERSION = "1"
PathLike = Union[str, "os.PathLike[str]"]


class TaskFileError(ValueError):
    """A task file that cannot be loaded into this model (corrupt, foreign or mismatched)."""


def _bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the gated layers' names, shapes, dtypes and base weights (which TAPS never
    changes): a task file made for one base refuses to load into another."""
    fp = fingerprint_of((name, m.weight) for name, m in taps_layers(model))
    if fp is None:
        raise ValueError(f"{type(model).__name__} has no TAPS layers; call taps_fast.convert(model) first")
    return fp


def fingerprint_of(weights: Iterable[Tuple[str, Tensor]]):
    """The fingerprint of (gated layer name, base weight) pairs, in order; None if there are none."""
    h = hashlib.sha256()
    n = 0
    for name, w in weights:
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}\n".encode())
        h.update(_bytes(w))
        n += 1
    return h.hexdigest() if n else None


def _checksum(tensors: Iterable[Tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for k, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _gated_keys(names: Iterable[str]) -> set:
    """state_dict keys of the gated layers' own tensors (base weight, delta, score)."""
    return {f"{n}.{k}" if n else k for n in names for k in ("weight", "delta", "score")}


def task_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """What the task adds to the base, keyed as in the file (tensors not copied)."""
    out: Dict[str, Tensor] = {}
    layers = list(taps_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no TAPS layers; call taps_fast.convert(model) first")
    for name, m in layers:
        out[f"score/{name}"] = m.score.detach()
        if gate_is_open(m.score, m.threshold, f"save_task: layer {name!r}"):
            if m.delta is None:
                raise ValueError(f"save_task: layer {name!r} is open but its delta was dropped")
            out[f"delta/{name}"] = m.delta.detach()
    norm_keys, head_keys = task_state_keys(model)
    state = model.state_dict(keep_vars=True)
    keys = set(norm_keys) | set(head_keys)
    gated = _gated_keys(n for n, _ in layers)
    keys |= {k for k, p in model.named_parameters() if p.requires_grad and k not in gated}
    for k in sorted(keys):
        out[f"state/{k}"] = state[k].detach()
    return out


def save_task(model: nn.Module, path: PathLike) -> int:
    """Write the task (scores, open deltas, norm layers, head, metadata) to a safetensors file;
    returns its size in bytes. The write is atomic: a crash leaves no half-written file."""
    thresholds = {n: m.threshold for n, m in taps_layers(model)}
    return write_task(task_tensors(model), thresholds, base_fingerprint(model), path)


def write_task(tensors: Dict[str, Tensor], thresholds: Dict[str, float], fingerprint: str,
               path: PathLike) -> int:
    """Write a task's tensors (keys as in the module docstring) atomically; returns the size."""
    from safetensors.torch import save_file

    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "taps_fast_version": __version__,
        "base_fingerprint": fingerprint,
        "thresholds": json.dumps(thresholds, separators=(",", ":")),
        "checksum": _checksum(tensors.items()),
    }
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".taps_task_", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def read_task_file(path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    looks_safetensors = len(head) == 9 and 8 + n <= size and head[8:9] == b"{"
    # A pickle starts with PROTO (0x80, protocol 2..5); torch.save's zip format with "PK\x03\x04".
    is_pickle = (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"
    if is_pickle and not looks_safetensors:
        raise TaskFileError(f"{path!r} is a pickle / torch.save file, not a safetensors task file; "
                            "taps_fast never unpickles files (they can run code)")
    try:
        tensors, meta = {}, None
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise TaskFileError(f"{path!r} is not a valid safetensors file (truncated or corrupt): {e}") from e
    if meta.get("format") != FORMAT:
        raise TaskFileError(f"{path!r} is a safetensors file but not a taps_fast task (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TaskFileError(f"{path!r} has task format version {meta.get('format_version')!r}; "
                            f"this taps_fast ({__version__}) reads version {FORMAT_VERSION}")
    if _checksum(tensors.items()) != meta.get("checksum"):
        raise TaskFileError(f"{path!r} is corrupt: its tensors do not match the checksum recorded when it was saved")
    return tensors, meta


def load_task(model: nn.Module, path: PathLike) -> nn.Module:
    """Restore a task saved by :func:`save_task` into a converted model of the same base.

    Everything is checked before anything is written, so a refused file leaves the model as it
    was: the file must be a valid, uncorrupted taps_fast task made for this base (fingerprint),
    with a score for every gated layer, a delta for exactly the open ones, and the norm/head
    state of this model, with matching shapes. Closed layers get a zero delta (or keep theirs
    dropped); open layers whose delta was dropped get it back.
    """
    path = os.fspath(path)
    tensors, meta = read_task_file(path)
    layers = dict(taps_layers(model))
    try:
        thresholds = json.loads(meta["thresholds"])
    except (KeyError, ValueError) as e:
        raise TaskFileError(f"{path!r}: missing or malformed 'thresholds' metadata") from e

    problems = []
    scores = {k[6:]: t for k, t in tensors.items() if k.startswith("score/")}
    deltas = {k[6:]: t for k, t in tensors.items() if k.startswith("delta/")}
    states = {k[6:]: t for k, t in tensors.items() if k.startswith("state/")}
    other = sorted(set(tensors) - {f"score/{k}" for k in scores} - {f"delta/{k}" for k in deltas}
                   - {f"state/{k}" for k in states})
    if other:
        problems.append(f"unexpected keys {other}")
    missing = sorted(set(layers) - set(scores))
    extra = sorted(set(scores) - set(layers))
    if missing or extra:  # checked before the fingerprint, which would only say "different"
        raise TaskFileError(
            f"{path!r} does not fit this {type(model).__name__}: its gated layers differ "
            f"(missing scores for layers {missing}; extra scores for layers this model does not have "
            f"{extra}): another base model, or converted with other include/exclude/head")
    fp = base_fingerprint(model)
    if meta.get("base_fingerprint") != fp:
        raise TaskFileError(f"{path!r} was made for a different base model: base fingerprint "
                            f"{meta.get('base_fingerprint', '?')[:16]}… in the file, {fp[:16]}… for this "
                            f"{type(model).__name__} ({len(layers)} gated layers)")
    opened = {}
    for n, s in scores.items():
        if n in layers:
            if s.dim() != 0:
                problems.append(f"score/{n} has shape {tuple(s.shape)}, expected a 0-dim tensor")
                continue
            opened[n] = gate_is_open(s, float(thresholds.get(n, layers[n].threshold)), f"{path!r} score/{n}")
    for n in sorted(set(deltas) - {n for n, o in opened.items() if o}):
        problems.append(f"extra key delta/{n} (layer {'closed' if n in layers else 'unknown'})")
    for n in sorted(n for n, o in opened.items() if o and n not in deltas):
        problems.append(f"missing key delta/{n} (the layer is open)")
    for n, t in deltas.items():
        if n in layers and tuple(t.shape) != tuple(layers[n].weight.shape):
            problems.append(f"delta/{n} has shape {tuple(t.shape)}, the layer's weight {tuple(layers[n].weight.shape)}")
    norm_keys, head_keys = task_state_keys(model)
    required = set(norm_keys) | set(head_keys)
    gated = _gated_keys(layers)
    optional = {k for k, _ in model.named_parameters()} - gated
    model_state = model.state_dict(keep_vars=True)
    for k in sorted(required - set(states)):
        problems.append(f"missing key state/{k}")
    for k in sorted(set(states) - required - optional):
        problems.append(f"extra key state/{k}")
    for k, t in states.items():
        if k in model_state and tuple(t.shape) != tuple(model_state[k].shape):
            problems.append(f"state/{k} has shape {tuple(t.shape)}, the model's {tuple(model_state[k].shape)}")
    if problems:
        raise TaskFileError(f"{path!r} does not fit this {type(model).__name__}: " + "; ".join(problems))

    with torch.no_grad():
        for n, m in layers.items():
            m.threshold = float(thresholds.get(n, m.threshold))
            m.score.copy_(scores[n])
            if opened[n]:
                if m.delta is None:
                    m.delta = nn.Parameter(torch.zeros_like(m.weight))
                m.delta.copy_(deltas[n])
            elif m.delta is not None:
                m.delta.zero_()
        for k, t in states.items():
            model_state[k].copy_(t)
    return model
