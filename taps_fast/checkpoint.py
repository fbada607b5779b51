"""Task checkpoints: a task as a small safetensors file of just what it adds to the base.

File layout (safetensors, so loading can never run code; nothing here unpickles):

    score/<layer>   every gated layer's score (0-dim)
    delta/<layer>   the delta of each layer whose gate is open (closed deltas are not stored)
    state/<key>     norm layers' parameters and buffers, the head, and any other parameter the
                    user left trainable (state_dict keys)

    metadata: format, format_version, taps_fast_version, base_fingerprint (SHA-256 of the gated
    layers' base weights), thresholds (JSON, per layer), checksum (SHA-256 of every other
    metadata field, then every tensor's name, dtype, shape and bytes, in key order: catches
    corrupted bytes and metadata, which safetensors' own header checks cannot); optionally
    labels (a JSON list of strings, the head's class names: as many as an nn.Linear head has
    outputs; format version 2 only, so covered by the checksum). A file written without labels
    has no 'labels' field at all (byte for byte the file of a taps_fast without them).

Format version 2 is written; version 1 (whose checksum covers the tensors only) is still read,
every field validated the same way, but a change to a version 1 file's metadata cannot be
detected: save it again to protect it.

Reading is checked whole before anything is used, and in an order that bounds the memory: the
header (names, dtypes, shapes) and the metadata are checked against the receiving model
(:class:`TaskSpec`) before any tensor data is read, so a file claiming a huge tensor is refused
without allocating it; then the data are read and the checksum verified; then the values (no
NaN score, no NaN/inf delta or norm state, no negative running variance, a delta for exactly
the open layers). Every refusal is a :class:`TaskFileError` naming the file and each problem.
One checker serves ``load_task`` and ``MultiTaskModel.add_task`` (files and models alike).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._version import __version__
from .convert import resolve_head, taps_layers, task_state_keys
from .ops._common import gate_is_open

FORMAT = "taps_fast.task"
FORMAT_VERSION = "2"
READ_VERSIONS = ("1", "2")
META_KEYS = ("format", "format_version", "taps_fast_version", "base_fingerprint", "thresholds", "checksum")
OPTIONAL_META_KEYS = ("labels",)  # allowed, not required (format version 2 only)
PathLike = Union[str, bytes, "os.PathLike[str]"]

# safetensors' dtype names (the header) as torch dtypes; a name not here is refused.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class TaskFileError(ValueError):
    """A task that cannot be loaded into this model (corrupt, foreign or mismatched file, or a
    model of another base): every refusal of a task file or task has this type."""


class TaskFileNotFoundError(TaskFileError, FileNotFoundError):
    """The task file does not exist (also a FileNotFoundError)."""


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


def _checksum(tensors: Iterable[Tuple[str, Tensor]], meta: Optional[Mapping[str, str]] = None) -> str:
    """SHA-256 of the metadata (every field but the checksum, in key order; format version 2)
    and of every tensor's name, dtype, shape and bytes, in key order. ``meta=None``: the
    tensors only (format version 1)."""
    h = hashlib.sha256()
    if meta is not None:
        fields = {k: v for k, v in meta.items() if k != "checksum"}
        h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    for k, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _gated_keys(names: Iterable[str]) -> set:
    """state_dict keys of the gated layers' own entries (base weight, delta, score, and the
    threshold, held as the layer's extra state)."""
    return {f"{n}.{k}" if n else k for n in names for k in ("weight", "delta", "score", "_extra_state")}


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


def save_task(model: nn.Module, path: PathLike, labels: Optional[List[str]] = None) -> int:
    """Write the task (scores, open deltas, norm layers, head, metadata) to a safetensors file;
    returns its size in bytes. The write is atomic: a crash leaves no half-written file.
    ``labels``: the head's class names, stored in the metadata (as many as each nn.Linear head
    has outputs); None stores none."""
    thresholds = {n: m.threshold for n, m in taps_layers(model)}
    if labels is not None:
        labels = check_label_list(labels, "save_task")
        for h in resolve_head(model):
            mod = model.get_submodule(h)
            if type(mod) is nn.Linear:
                check_label_count(labels, mod.out_features, h, "save_task", ValueError)
    return write_task(task_tensors(model), thresholds, base_fingerprint(model), path, labels=labels)


def check_label_list(labels, where: str) -> List[str]:
    """``labels`` as a list of str (a list or tuple of strings); TypeError otherwise."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise TypeError(f"{where}: labels must be a list of strings, got {type(labels).__name__}")
    bad = [i for i, v in enumerate(labels) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{where}: labels must be a list of strings; item {bad[0]} is a "
                        f"{type(labels[bad[0]]).__name__}")
    return list(labels)


def check_label_count(labels: List[str], outputs: int, head: str, where: str, error=None) -> None:
    """As many labels as the nn.Linear head ``head`` has outputs; ``error`` (TaskFileError by
    default) names both numbers otherwise."""
    if len(labels) != outputs:
        raise (error or TaskFileError)(f"{where}: {len(labels)} labels for the head {head!r}, which has "
                                       f"{outputs} outputs: give one label per output")


def write_task(tensors: Dict[str, Tensor], thresholds: Dict[str, float], fingerprint: str,
               path: PathLike, labels: Optional[List[str]] = None) -> int:
    """Write a task's tensors (keys as in the module docstring) atomically; returns the size.
    Refuses to write what load_task would refuse to read (a non-finite or non-real threshold,
    labels that are not a list of strings). ``labels=None`` writes no 'labels' field."""
    from safetensors.torch import save_file

    bad = {n: v for n, v in thresholds.items() if not _is_finite_real(v)}
    if bad:
        raise ValueError(f"write_task: thresholds must be finite real numbers, got {bad}")
    if labels is not None:
        labels = check_label_list(labels, "write_task")
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "taps_fast_version": __version__,
        "base_fingerprint": fingerprint,
        "thresholds": json.dumps({n: float(v) for n, v in thresholds.items()}, separators=(",", ":")),
    }
    if labels is not None:
        meta["labels"] = json.dumps(labels, separators=(",", ":"))
    meta["checksum"] = _checksum(tensors.items(), meta)
    path = _fspath(path)
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


def _fspath(path) -> str:
    if isinstance(path, bytes):
        return os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a task file path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _is_finite_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- what a model holds
Shape = Tuple[Optional[int], ...]  # None: any size in that dimension (a task's own head rows)


@dataclass
class TaskSpec:
    """What a receiving model holds, key by key: the one description that every task (a file, or
    a converted model's tensors) is checked against before anything is read or written.

    ``layers``: gated layer -> (weight shape, weight dtype, score dtype); a delta must have the
    weight's shape and dtype, a score be 0-dim of the score dtype. ``states``: ``state/`` keys
    the task must carry -> (shape, dtype); ``optional``: keys it may carry (parameters of the
    base the user left trainable). ``extra_hint`` is added to the refusal of unknown state keys.
    ``label_keys``: the ``state/`` keys (without the prefix) of the nn.Linear heads' weights,
    whose first dimension is the number of labels a task file's 'labels' metadata must hold.
    """

    owner: str
    fingerprint: str
    layers: Dict[str, Tuple[Tuple[int, ...], torch.dtype, torch.dtype]]
    states: Dict[str, Tuple[Shape, torch.dtype]]
    optional: Dict[str, Tuple[Shape, torch.dtype]] = field(default_factory=dict)
    extra_hint: str = ""
    label_keys: Tuple[str, ...] = ()


def linear_head_weight_keys(model: nn.Module, heads: Iterable[str]) -> Tuple[str, ...]:
    """The state_dict keys of the weights of those of ``heads`` that are nn.Linear."""
    return tuple(f"{h}.weight" for h in heads if type(model.get_submodule(h)) is nn.Linear)


def spec_of(model: nn.Module) -> TaskSpec:
    """The TaskSpec of a converted model (what ``load_task`` checks a file against)."""
    layers = dict(taps_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no TAPS layers; call taps_fast.convert(model) first")
    state = model.state_dict(keep_vars=True)
    norm_keys, head_keys = task_state_keys(model)
    gated = _gated_keys(layers)
    required = set(norm_keys) | set(head_keys)
    optional = {k for k, _ in model.named_parameters()} - gated - required
    return TaskSpec(
        owner=type(model).__name__,
        fingerprint=base_fingerprint(model),
        layers={n: (tuple(m.weight.shape), m.weight.dtype, m.score.dtype) for n, m in layers.items()},
        states={k: (tuple(state[k].shape), state[k].dtype) for k in sorted(required)},
        optional={k: (tuple(state[k].shape), state[k].dtype) for k in sorted(optional)},
        label_keys=linear_head_weight_keys(model, resolve_head(model)))


def _shape_fits(shape: Tuple[int, ...], want: Shape) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _shape_str(want: Shape) -> str:
    return "(" + ", ".join("any" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"


def check_header(header: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]], fingerprint: Optional[str],
                 spec: TaskSpec, where: str) -> None:
    """Check a task's names, shapes and dtypes (and its base fingerprint) against ``spec``,
    before any tensor data is read: every key must be one the model holds, with its shape and
    dtype. Raises one TaskFileError listing every problem."""
    problems: List[str] = []
    scores = {k[6:] for k in header if k.startswith("score/")}
    deltas = {k[6:] for k in header if k.startswith("delta/")}
    states = {k[6:] for k in header if k.startswith("state/")}
    other = sorted(set(header) - {f"score/{k}" for k in scores} - {f"delta/{k}" for k in deltas}
                   - {f"state/{k}" for k in states})
    if other:
        problems.append(f"unexpected keys {other} (a task holds score/, delta/ and state/ keys)")
    missing, extra = sorted(set(spec.layers) - scores), sorted(scores - set(spec.layers))
    if missing or extra:  # checked before the fingerprint, which would only say "different"
        raise TaskFileError(
            f"{where} does not fit this {spec.owner}: its gated layers differ (missing scores for "
            f"layers {missing}; extra scores for layers this model does not have {extra}): another "
            "base model, or converted with other include/exclude/head")
    if fingerprint != spec.fingerprint:
        raise TaskFileError(f"{where} was made for a different base model: base fingerprint "
                            f"{str(fingerprint)[:16]}… in the task, {spec.fingerprint[:16]}… for this "
                            f"{spec.owner} ({len(spec.layers)} gated layers)")
    for n, (wshape, wdtype, sdtype) in spec.layers.items():
        shape, dtype = header[f"score/{n}"]
        if shape != () or dtype != sdtype:
            problems.append(f"score/{n} is {dtype} of shape {shape}, expected a 0-dim {sdtype} tensor")
        if n in deltas:
            shape, dtype = header[f"delta/{n}"]
            if shape != wshape:
                problems.append(f"delta/{n} has shape {shape}, the layer's weight {wshape}")
            if dtype != wdtype:
                problems.append(f"delta/{n} is {dtype}, the layer's weight {wdtype}")
    for n in sorted(deltas - set(spec.layers)):
        problems.append(f"extra key delta/{n} (no such gated layer)")
    for k in sorted(set(spec.states) - states):
        problems.append(f"missing key state/{k}")
    unknown = sorted(states - set(spec.states) - set(spec.optional))
    for k in unknown:
        problems.append(f"extra key state/{k}")
    if unknown and spec.extra_hint:
        problems.append(spec.extra_hint)
    for k in sorted(states & (set(spec.states) | set(spec.optional))):
        want_shape, want_dtype = spec.states.get(k) or spec.optional[k]
        shape, dtype = header[f"state/{k}"]
        if not _shape_fits(shape, want_shape):
            problems.append(f"state/{k} has shape {shape}, the model's {_shape_str(want_shape)}")
        if dtype != want_dtype:
            problems.append(f"state/{k} is {dtype}, the model's {want_dtype}")
    if problems:
        raise TaskFileError(f"{where} does not fit this {spec.owner}: " + "; ".join(problems))


def check_values(tensors: Mapping[str, Tensor], thresholds: Mapping[str, float], spec: TaskSpec,
                 where: str) -> Dict[str, bool]:
    """Check a task's values (after check_header): no NaN score, a delta for exactly the open
    layers, no NaN/inf in a delta or a floating-point state, no negative running variance.
    Returns each layer's gate (open or not). Raises one TaskFileError listing every problem."""
    problems: List[str] = []
    opened: Dict[str, bool] = {}
    for n in spec.layers:
        s = tensors[f"score/{n}"]
        if bool(torch.isnan(s)):
            problems.append(f"score/{n} is NaN (the gate is undefined)")
            continue
        opened[n] = bool(s >= thresholds[n])  # torch's comparison: τ rounded to the score dtype
        has = f"delta/{n}" in tensors
        if opened[n] and not has:
            problems.append(f"missing key delta/{n} (the layer is open)")
        elif has and not opened[n]:
            problems.append(f"extra key delta/{n} (the layer is closed)")
    for k, t in tensors.items():
        if k.startswith(("delta/", "state/")) and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                problems.append(f"{k} holds {bad} NaN/inf value(s)")
            elif k.endswith("running_var") and bool((t < 0).any()):
                problems.append(f"{k} holds negative variances")
    if problems:
        raise TaskFileError(f"{where} does not fit this {spec.owner}: " + "; ".join(problems))
    return opened


def header_of(tensors: Mapping[str, Tensor]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


# ----------------------------------------------------------------------------- reading a file
def parse_thresholds(text, layers: Iterable[str], where: str) -> Dict[str, float]:
    """The ``thresholds`` metadata: a JSON object with a finite real τ for every gated layer
    and no other key."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise TaskFileError(f"{where}: the 'thresholds' metadata is not valid JSON ({e})") from None
    return check_thresholds(obj, layers, where)


def check_thresholds(obj, layers: Iterable[str], where: str) -> Dict[str, float]:
    """A task's thresholds: a mapping with a finite real τ for every gated layer, no other key."""
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: the 'thresholds' metadata must be a JSON object of layer -> "
                            f"threshold, got a {type(obj).__name__}")
    layers = list(layers)
    problems = []
    missing, extra = sorted(set(layers) - set(obj)), sorted(set(obj) - set(layers))
    if missing:
        problems.append(f"no threshold for layers {missing}")
    if extra:
        problems.append(f"thresholds for layers this model does not have {extra}")
    bad = {n: v for n, v in obj.items() if n in layers and not _is_finite_real(v)}
    if bad:
        problems.append(f"thresholds must be finite real numbers, got {bad}")
    if problems:
        raise TaskFileError(f"{where}: malformed 'thresholds' metadata: " + "; ".join(problems))
    return {n: float(obj[n]) for n in layers}


class TaskFile:
    """An opened task file: its validated metadata and its header (name -> shape, dtype); no
    tensor data has been read (read_tensors does that, verifying the checksum)."""

    def __init__(self, path) -> None:
        from safetensors import safe_open

        path = _fspath(path)
        self.path, self.where = path, repr(path)
        if os.path.isdir(path):
            raise TaskFileError(f"task file {path!r} is a directory, not a file")
        if not os.path.isfile(path):
            raise TaskFileNotFoundError(f"task file {path!r} does not exist")
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
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                header = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    header[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise TaskFileError(f"{path!r} is not a valid safetensors file (truncated or corrupt): {e}") from e
        if meta.get("format") != FORMAT:
            raise TaskFileError(f"{path!r} is a safetensors file but not a taps_fast task (format={meta.get('format')!r})")
        if meta.get("format_version") not in READ_VERSIONS:
            raise TaskFileError(f"{path!r} has task format version {meta.get('format_version')!r}; "
                                f"this taps_fast ({__version__}) reads versions {', '.join(READ_VERSIONS)}")
        problems = [f"missing metadata field {k!r}" for k in META_KEYS if k not in meta]
        problems += [f"unknown metadata field {k!r}" for k in sorted(set(meta) - set(META_KEYS)
                                                                      - set(OPTIONAL_META_KEYS))]
        labels = None
        if "labels" in meta:
            if meta.get("format_version") == "1":
                problems.append("metadata field 'labels' in a format version 1 file (whose checksum "
                                "does not cover the metadata)")
            else:
                labels, why = _parse_labels(meta["labels"])
                if why:
                    problems.append(why)
        for k in ("base_fingerprint", "checksum"):
            v = meta.get(k, "")
            if k in meta and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
                problems.append(f"metadata field {k!r} is not a SHA-256 hex digest")
        bad_dtypes = sorted(k for k, (_, dt) in header.items() if dt not in _ST_DTYPES)
        if bad_dtypes:
            problems.append(f"tensors of a dtype a task never holds: {bad_dtypes}")
        if problems:
            raise TaskFileError(f"{path!r} is not a valid taps_fast task: " + "; ".join(problems))
        self.meta = meta
        self.header = {k: (shape, _ST_DTYPES[dt]) for k, (shape, dt) in header.items()}
        self.labels: Optional[List[str]] = labels  # the head's class names, or None (no 'labels' field)

    def check_labels(self, spec: TaskSpec) -> None:
        """The labels (if any) number the outputs of each nn.Linear head of ``spec`` (its
        ``label_keys``), read from the header: no tensor data needed."""
        if self.labels is None:
            return
        for k in spec.label_keys:
            got = self.header.get(f"state/{k}")
            if got is not None and len(got[0]) >= 1:
                check_label_count(self.labels, got[0][0], k[:-len(".weight")], self.where)

    def read_tensors(self) -> Dict[str, Tensor]:
        """Every tensor's data (after check_header bounded their sizes), checksum verified."""
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in self.header}
        except Exception as e:
            raise TaskFileError(f"{self.where} is not a valid safetensors file (truncated or corrupt): {e}") from e
        covered = self.meta if self.meta["format_version"] != "1" else None
        if _checksum(tensors.items(), covered) != self.meta["checksum"]:
            what = "tensors or metadata do" if covered is not None else "tensors do"
            raise TaskFileError(f"{self.where} is corrupt: its {what} not match the checksum recorded when it was saved")
        return tensors


def _parse_labels(text) -> Tuple[Optional[List[str]], Optional[str]]:
    """The 'labels' metadata: (a list of str, None), or (None, why not)."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        return None, f"the 'labels' metadata is not valid JSON ({e})"
    if not isinstance(obj, list):
        return None, f"the 'labels' metadata must be a JSON list of strings, got a {type(obj).__name__}"
    bad = [i for i, v in enumerate(obj) if not isinstance(v, str)]
    if bad:
        return None, (f"the 'labels' metadata must be a JSON list of strings; item {bad[0]} is a "
                      f"{type(obj[bad[0]]).__name__}")
    return obj, None


def read_task(path, spec: TaskSpec) -> Tuple[Dict[str, Tensor], Dict[str, float], Dict[str, bool]]:
    """Open, check and read a task file for a model described by ``spec``: (tensors, thresholds,
    each layer's gate). Header and metadata are checked before any data is read."""
    tensors, thresholds, opened, _ = read_task_with_labels(path, spec)
    return tensors, thresholds, opened


def read_task_with_labels(path, spec: TaskSpec):
    """read_task, and the file's labels (None when it has none): (tensors, thresholds, each
    layer's gate, labels)."""
    tf = TaskFile(path)
    check_header(tf.header, tf.meta["base_fingerprint"], spec, tf.where)
    thresholds = parse_thresholds(tf.meta["thresholds"], spec.layers, tf.where)
    tf.check_labels(spec)
    tensors = tf.read_tensors()
    opened = check_values(tensors, thresholds, spec, tf.where)
    return tensors, thresholds, opened, tf.labels


def load_task(model: nn.Module, path: PathLike) -> nn.Module:
    """Restore a task saved by :func:`save_task` into a converted model of the same base.

    Everything is checked before anything is written, so a refused file leaves the model as it
    was (see the module docstring for what is checked and in which order): the file must be a
    valid, uncorrupted taps_fast task made for this base (fingerprint), with a score for every
    gated layer, a delta for exactly the open ones, and the norm/head state of this model, with
    matching shapes and dtypes. Closed layers get a zero delta (or keep theirs dropped); open
    layers whose delta was dropped get it back.
    """
    tensors, thresholds, opened = read_task(path, spec_of(model))
    layers = dict(taps_layers(model))
    model_state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for n, m in layers.items():
            m.threshold = thresholds[n]
            m.score.copy_(tensors[f"score/{n}"])
            if opened[n]:
                if m.delta is None:
                    m.delta = nn.Parameter(torch.zeros_like(m.weight))
                m.delta.copy_(tensors[f"delta/{n}"])
            elif m.delta is not None:
                m.delta.zero_()
        for k, t in tensors.items():
            if k.startswith("state/"):
                model_state[k[6:]].copy_(t)
    return model
