"""Import checkpoints written by the TAPS authors' public code into a taps_fast model, to save
them as taps_fast task files (:func:`import_authors_checkpoint`, :func:`convert_authors_checkpoint`).

What their code writes (github.com/MattWallingford/TAPS; file paths in that repository, read at
commits f733cd9 (models/taps_net.py), 1cc9edd (train_sequential.py, train_joint.py), 202e1a2
(fine_tune_freeze_pb.py, options.py), 02f128b (VisualizeLayers.ipynb), d299e12
(models/multihead_net.py), d88a91d (models/vision_transformer.py)):

- models/taps_net.py: the ResNets are rebuilt with ``freeze_conv``, an nn.Conv2d (bias=False) with
  two extra parameters, ``residual`` (ΔW: the weight's shape, zeros at init) and ``indicator``
  (the score s: shape [1], 0.15 at init). Its forward uses ``weight + I * residual`` with
  ``I = (indicator >= THRESHOLD).float()``, ``THRESHOLD = .1`` (straight-through backward). Every
  conv is one: the stem ``conv1``, the block convs and ``downsample.0``; the module names are
  torchvision's (conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0, fc). The norm layers are
  plain nn.BatchNorm2d (the ``freeze_norm`` class there is never used), the head a plain nn.Linear
  (train_sequential.py: ``model.fc = nn.Linear(embedding_dim, num_classes)``); both train.
- train_sequential.py and fine_tune_freeze_pb.py save
  ``torch.save({'arch': opts.args.arch, 'epoch': epoch, 'state_dict': ...}, '.../model_best.pth')``:
  the whole model's state dict, i.e. the frozen base weights, every conv's residual and indicator
  (closed ones included), BatchNorm parameters and running statistics, fc. train_sequential.py
  saves ``model.module.state_dict()`` under --multi_gpu; fine_tune_freeze_pb.py saves the
  nn.DataParallel wrapper's ``model.state_dict()``, whose keys start with ``module.``. 'arch' is
  --arch (default 'resnet50'), not --model_type (default 'resnet34'), which picks the network
  (options.py): it is not trusted here; the architecture is read from the keys.
- VisualizeLayers.ipynb reads them back the same way (the file's ``['state_dict']``), a layer being
  open iff ``indicator >= threshold`` (.1).
- Not importable: models/multihead_net.py (train_joint.py) has plain nn.Conv2d, no residual or
  indicator. models/vision_transformer.py takes ``Mlp_Freeze`` from an unpublished timm fork, so
  its key layout is not public: only the ResNet layout above is verified. The mapping is by module
  name (``<layer>.residual``/``<layer>.indicator``), so it would apply to any model named alike.

Mapping: ``<layer>.residual`` -> ``<layer>.delta``; ``<layer>.indicator`` (shape [1]) ->
``<layer>.score`` (0-dim); norm and head tensors by their own names. The gate is the same in both
codes, 1[s >= τ] with τ = 0.1, compared in the score's dtype (fp32), so no layer changes state.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import PathLike, TaskFileError, _gated_keys, save_task
from .convert import taps_layers, task_state_keys
from .ops._common import check_threshold, gate_is_open

log = logging.getLogger("taps_fast")

AUTHORS_THRESHOLD = 0.1  # models/taps_net.py: THRESHOLD = .1, gate (indicator >= THRESHOLD)
_RESIDUAL, _INDICATOR = "residual", "indicator"


class AuthorsCheckpointError(TaskFileError):
    """An authors' checkpoint that cannot be read, or does not fit the model."""


@dataclass
class AuthorsImport:
    """What :func:`import_authors_checkpoint` did.

    ``base``: "checked" (the checkpoint's base weights equal the model's), "loaded" (copied into
    the model) or "unchecked" (the checkpoint lacks some of them). ``state``: norm and head tensors
    imported. ``ignored``/``missing`` (strict=False only): checkpoint keys not used, and task keys
    the checkpoint lacks (left as they were in the model). ``meta``: the wrapper's other entries
    ('arch', 'epoch') as saved. ``task_bytes``: size of the task file (convert_authors_checkpoint).
    """

    layers: int
    open: List[str]
    closed: List[str]
    threshold: float
    base: str
    state: int
    ignored: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    meta: Dict[str, object] = field(default_factory=dict)
    task_bytes: Optional[int] = None


def _few(names, n: int = 10) -> str:
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return f"{names[:n]}{more}"


def _read(src) -> Tuple[Dict[str, Tensor], Dict[str, object], str]:
    """(state dict without the DataParallel prefix, the wrapper's other entries, a name for errors)."""
    if isinstance(src, Mapping):
        obj, where = src, "the checkpoint"
    else:
        path = os.fspath(src)
        where = repr(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {where} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refusals (pickle.UnpicklingError), zip/EOF/decode errors
            glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if glob:
                raise AuthorsCheckpointError(
                    f"{where} needs pickle beyond tensors and plain containers: it holds a "
                    f"{glob.group(1)} object. taps_fast loads checkpoints only with "
                    "torch.load(weights_only=True), which cannot run code. If you trust the file, "
                    "load it with weights_only=False in a Python process of your own and torch.save its "
                    "['state_dict'] alone") from None
            why = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(\n\n|$)", str(e), re.S)
            why = why.group(1) if why else (str(e).splitlines() or ["no detail"])[0]
            raise AuthorsCheckpointError(f"{where} is corrupt or not a torch.save file "
                                         f"({type(e).__name__}: {why})") from None
    meta: Dict[str, object] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise AuthorsCheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict "
                                     "or {'state_dict': state dict}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise AuthorsCheckpointError(f"{where}: state dict entries that are not tensors: {_few(map(str, bad))}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from an nn.DataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, meta, where


def import_authors_checkpoint(
    src: Union[PathLike, Mapping[str, object]],
    model: nn.Module,
    *,
    threshold: Optional[float] = None,
    base: str = "check",
    strict: bool = True,
) -> AuthorsImport:
    """Load an authors' TAPS checkpoint (a ``model_best.pth`` path, or the dict torch.load gave)
    into ``model``, a torchvision ResNet of the same architecture and number of classes converted
    with ``taps_fast.convert(model, head="fc")``; then ``taps_fast.save_task(model, path)`` writes
    the task file. Returns an :class:`AuthorsImport`; logs a summary.

    Per gated conv: residual -> delta, indicator -> score, layer threshold := τ; BatchNorm
    parameters and running statistics and the fc head are copied. Files are read with
    ``torch.load(weights_only=True)`` only; one that needs more pickle than tensors is refused.

    - ``threshold``: the τ of the authors' run (their module constant ``THRESHOLD``); None = 0.1,
      their default. Their gate is ``indicator >= τ``, the same ``>=`` as taps_fast's.
    - ``base``: a task file is keyed to its base model's fingerprint, so the base must be settled.
      "check" (default): the checkpoint's base conv weights must equal the model's bit for bit
      (the authors freeze them: no gradient, so no optimizer step changes them), e.g. the model was
      built from the same pretrained weights (torchvision IMAGENET1K_V1, what ``pretrained=True``
      gave their utils.get_pretrained_weights); the task file then fits that base. "load": copy
      the checkpoint's base weights into the model, so the checkpoint defines the base (and the
      task file fits only models with those weights).
    - ``strict``: unknown checkpoint keys or missing norm/head/residual/indicator keys are errors;
      with strict=False they are skipped, logged and listed in the result. A different set of
      gated layers (architecture) or a shape mismatch is always an error.

    Everything is checked before anything is written: a refused checkpoint leaves the model as it was.
    """
    if base not in ("check", "load"):
        raise ValueError(f"import_authors_checkpoint: base must be 'check' or 'load', got {base!r}")
    tau = AUTHORS_THRESHOLD if threshold is None else threshold
    check_threshold(tau, "import_authors_checkpoint: threshold", finite=True)
    tau = float(tau)
    layers = dict(taps_layers(model))
    if not layers:
        raise ValueError(f"import_authors_checkpoint: {type(model).__name__} has no TAPS layers; convert "
                         "it first: taps_fast.convert(model, head='fc')")
    sd, meta, where = _read(src)
    name = type(model).__name__

    gated_ck = {k.rpartition(".")[0] for k in sd if k.rpartition(".")[2] in (_RESIDUAL, _INDICATOR)}
    if not gated_ck:
        raise AuthorsCheckpointError(
            f"{where} has no '<conv>.residual' / '<conv>.indicator' keys: not a checkpoint of the authors' "
            "TAPS ResNet (models/taps_net.py); e.g. a plain state dict, or a multihead_net.py joint model")
    only_ck, only_model = sorted(gated_ck - set(layers)), sorted(set(layers) - gated_ck)
    if only_ck or only_model:
        plain = [n for n in only_model if f"{n}.weight" in sd]
        hint = (f"; {_few(plain)} are plain layers in the checkpoint (the head): convert with "
                f"taps_fast.convert(model, head={plain[0]!r})" if plain else "")
        arch = (f"; its 'arch' field says {meta['arch']!r}, but the authors' scripts fill that from --arch, "
                "not from --model_type, which picks the network" if "arch" in meta else "")
        sides = "; ".join(f"only in the {w}: {_few(v)}"
                          for w, v in (("checkpoint", only_ck), ("model", only_model)) if v)
        raise AuthorsCheckpointError(
            f"{where} does not fit this {name}: architecture mismatch: the checkpoint gates {len(gated_ck)} "
            f"layers, the model {len(layers)}; {sides}{hint}{arch}")

    # Checkpoint key -> (model state key, kind). delta/score/task keys are required, base optional.
    norm_keys, head_keys = task_state_keys(model)
    state = model.state_dict(keep_vars=True)
    gated = _gated_keys(layers)
    task = set(norm_keys) | set(head_keys)
    task |= {k for k, p in model.named_parameters() if p.requires_grad and k not in gated}
    plan: Dict[str, Tuple[str, str]] = {}
    for n in layers:
        plan[f"{n}.{_RESIDUAL}"] = (f"{n}.delta", "delta")
        plan[f"{n}.{_INDICATOR}"] = (f"{n}.score", "score")
    for k in state:
        if k in gated and k.rpartition(".")[2] in ("delta", "score", "_extra_state"):  # τ: the threshold argument
            continue
        plan[k] = (k, "task" if k in task else "base")

    missing = sorted(ck for ck, (_, kind) in plan.items() if kind != "base" and ck not in sd)
    ignored = sorted(set(sd) - set(plan))
    if strict and (missing or ignored):
        keys = "; ".join(f"{w} keys {_few(v)}" for w, v in (("missing", missing), ("unexpected", ignored)) if v)
        raise AuthorsCheckpointError(f"{where} does not fit this {name}: {keys} (strict=False skips them)")

    problems = []
    for ck, (mk, kind) in plan.items():
        if ck not in sd:
            continue
        t = sd[ck]
        if kind == "score":
            if t.numel() != 1 or t.dim() > 1:
                problems.append(f"{ck} has shape {tuple(t.shape)}, expected (1,)")
            continue
        target = layers[ck.rpartition(".")[0]].weight if kind == "delta" else state[mk]
        if tuple(t.shape) != tuple(target.shape):
            hint = " (build the model with the checkpoint's num_classes)" if mk in head_keys else ""
            problems.append(f"{ck} has shape {tuple(t.shape)} in the checkpoint, {tuple(target.shape)} in the "
                            f"model{hint}")
        elif t.is_floating_point() != target.is_floating_point():
            problems.append(f"{ck} is {t.dtype} in the checkpoint, {target.dtype} in the model")
    if problems:
        more = "; ..." if len(problems) > 10 else ""
        raise AuthorsCheckpointError(f"{where} does not fit this {name}: {len(problems)} shape/dtype "
                                     f"mismatches: " + "; ".join(problems[:10]) + more)

    base_keys = [ck for ck, (_, kind) in plan.items() if kind == "base"]
    absent = [ck for ck in base_keys if ck not in sd]
    if base == "load" and absent:
        raise AuthorsCheckpointError(f"{where} lacks base weights {_few(absent)}, so base='load' cannot "
                                     "take the base from it; use base='check' with the model's own base")
    if base == "check":
        diff = []
        for ck in base_keys:
            if ck in sd:
                ours = state[plan[ck][0]].detach()
                theirs = sd[ck].to(device=ours.device, dtype=ours.dtype)
                if not torch.equal(theirs, ours):
                    gap = (f" (max |diff| {float((theirs.double() - ours.double()).abs().max()):.3g})"
                           if ours.is_floating_point() else "")
                    diff.append(ck + gap)
        if diff:
            raise AuthorsCheckpointError(
                f"{where} was trained from another base than this {name}: {len(diff)} base tensors differ: "
                f"{_few(diff)}. Build the model from the pretrained weights the run started from "
                "(torchvision IMAGENET1K_V1 for pretrained=True), or pass base='load' to take the base "
                "from the checkpoint (the task file then fits only that base)")

    opened: Dict[str, bool] = {}
    for n, m in layers.items():
        ck = f"{n}.{_INDICATOR}"
        if ck not in sd:
            continue
        s = sd[ck].reshape(())
        opened[n] = gate_is_open(s, tau, f"{where} {ck}")  # in the checkpoint's dtype, as the authors
        if gate_is_open(s.to(m.score.dtype), tau, f"{where} {ck}") != opened[n]:
            raise AuthorsCheckpointError(
                f"{where} {ck} = {float(s)!r} is {'open' if opened[n] else 'closed'} at τ={tau} in "
                f"{s.dtype} but flips in the model's {m.score.dtype}; import into a {s.dtype} model, then cast")

    retuned = sum(1 for m in layers.values() if m.threshold != tau)
    with torch.no_grad():
        for n, m in layers.items():
            m.threshold = tau
            if f"{n}.{_INDICATOR}" in sd:
                m.score.copy_(sd[f"{n}.{_INDICATOR}"].reshape(()))
            if m.delta is None and (f"{n}.{_RESIDUAL}" in sd or opened.get(n)):  # dropped by freeze_gates
                m.delta = nn.Parameter(torch.zeros_like(m.weight))
            if f"{n}.{_RESIDUAL}" in sd:
                m.delta.copy_(sd[f"{n}.{_RESIDUAL}"])
        n_state = 0
        for ck, (mk, kind) in plan.items():
            if ck in sd and (kind == "task" or (kind == "base" and base == "load")):
                state[mk].copy_(sd[ck])
                n_state += kind == "task"

    base_state = "loaded" if base == "load" else ("unchecked" if absent else "checked")
    report = AuthorsImport(
        layers=len(layers), open=[n for n in layers if opened.get(n)],
        closed=[n for n in layers if n in opened and not opened[n]], threshold=tau, base=base_state,
        state=n_state, ignored=ignored, missing=missing,
        meta={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))})
    log.info("taps_fast.import_authors_checkpoint: %s: %d gated layers (%d open, %d closed at τ=%g), "
             "%d norm/head tensors; base weights %s", where, report.layers, len(report.open),
             len(report.closed), tau, n_state, base_state)
    if retuned:
        log.info("taps_fast.import_authors_checkpoint: set the threshold of %d layers to τ=%g", retuned, tau)
    if absent and base == "check":
        log.warning("taps_fast.import_authors_checkpoint: %s lacks %d base tensors %s: the base could not be "
                    "fully checked", where, len(absent), _few(absent, 5))
    if ignored or missing:
        log.warning("taps_fast.import_authors_checkpoint: strict=False: ignored checkpoint keys %s; missing "
                    "keys left as they were %s", _few(ignored, 5), _few(missing, 5))
    return report


def convert_authors_checkpoint(src: Union[PathLike, Mapping[str, object]], dst: PathLike,
                               model: nn.Module, **kwargs) -> AuthorsImport:
    """:func:`import_authors_checkpoint` (same keyword arguments) then :func:`save_task` to
    ``dst``; returns the import's result with ``task_bytes`` set."""
    report = import_authors_checkpoint(src, model, **kwargs)
    report.task_bytes = save_task(model, dst)
    log.info("taps_fast.convert_authors_checkpoint: wrote %s (%d bytes)", os.fspath(dst), report.task_bytes)
    return report
