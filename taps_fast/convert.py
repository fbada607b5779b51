"""Model conversion (any nn.Module, timm or not) and merging back to a plain model."""
from __future__ import annotations

import copy
import fnmatch
import logging
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .ops._common import check_threshold, gate_is_open
from .modules import DEFAULT_INIT_SCORE, DEFAULT_THRESHOLD, TAPS_LAYERS, TAPSConv2d, TAPSLinear

log = logging.getLogger("taps_fast")

_NORM_TYPES = tuple(t for t in (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
) if t is not None)
# timm's own norms (LayerNorm2d, RmsNorm, GroupNorm1, BatchNormAct2d, FrozenBatchNorm2d, ...) by name.
_NORM_NAME = re.compile(r"(Batch|Layer|Group|Instance|Rms|RMS|Simple)Norm")

Names = Optional[Union[str, Sequence[str]]]


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer: trainable and task-specific under TAPS."""
    return isinstance(m, _NORM_TYPES) or bool(_NORM_NAME.search(type(m).__name__))


def taps_layers(model: nn.Module) -> Iterator[Tuple[str, Union[TAPSLinear, TAPSConv2d]]]:
    """(name, layer) for every TAPS layer of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, TAPS_LAYERS):
            yield name, m


def _as_list(v: Names) -> List[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _within(name: str, roots: Iterable[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


def resolve_head(model: nn.Module, head: Names = "auto") -> List[str]:
    """Module names of the classifier head(s).

    "auto": what ``model.get_classifier()`` returns (timm; several for distilled models), else the
    head recorded by an earlier ``convert``; None: no head; a name or list of names: those.
    """
    if head == "auto":
        if hasattr(model, "_taps_head"):
            return list(model._taps_head)
        get = getattr(model, "get_classifier", None)
        if get is None:
            return []
        clf = get()
        clfs = clf if isinstance(clf, (tuple, list)) else [clf]
        ids = {id(c) for c in clfs if isinstance(c, nn.Module) and not isinstance(c, nn.Identity)}
        return [n for n, m in model.named_modules() if id(m) in ids and n]
    names = _as_list(head)
    known = dict(model.named_modules())
    for n in names:
        if n not in known:
            raise ValueError(f"head {n!r} is not a module of {type(model).__name__}")
    return names


def _why_not_convertible(name: str, m: nn.Module, parents: Dict[str, nn.Module]) -> Optional[str]:
    base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
    if type(m).forward is not base.forward:
        return (f"{type(m).__name__} overrides {base.__name__}.forward (e.g. weight standardisation or "
                "dynamic padding), so a gated weight would change what it computes")
    parent = parents.get(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly, bypassing the module"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "lazy module with uninitialized parameters (run one forward pass first)"
    return None


def _replace_modules(model: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Swap every reference to an old module (by id) for its replacement, shared ones included."""
    for mod in model.modules():
        for k, child in list(mod._modules.items()):
            if child is not None and id(child) in mapping:
                mod._modules[k] = mapping[id(child)]


def task_state_keys(model: nn.Module) -> Tuple[List[str], List[str]]:
    """state_dict keys a task owns besides scores and deltas: (norm keys, head keys).

    Norm layers: their own parameters and persistent buffers (running stats). Heads: everything
    under the head module. Norms inside the head count as head.
    """
    heads = resolve_head(model)
    norm_keys: List[str] = []
    for name, m in model.named_modules():
        if is_norm(m) and not _within(name, heads):
            pre = name + "." if name else ""
            norm_keys += [pre + k for k, p in m._parameters.items() if p is not None]
            norm_keys += [pre + k for k, b in m._buffers.items()
                          if b is not None and k not in m._non_persistent_buffers_set]
    head_keys: List[str] = []
    for h in heads:
        head_keys += list(model.get_submodule(h).state_dict(prefix=h + ".").keys())
    return norm_keys, head_keys


def convert(
    model: nn.Module,
    include: Names = None,
    exclude: Names = None,
    threshold: float = DEFAULT_THRESHOLD,
    init_score: float = DEFAULT_INIT_SCORE,
    head: Names = "auto",
) -> nn.Module:
    """Make ``model`` a TAPS model, in place: every nn.Linear and nn.Conv2d becomes a TAPSLinear /
    TAPSConv2d sharing its weight (frozen) and bias.

    - ``include`` / ``exclude``: module names or fnmatch patterns (``"blocks.*.attn.*"``);
      include=None means every layer. A pattern that matches no layer is an error.
    - ``head``: the classifier head, left unwrapped and fully trainable ("auto": timm's
      ``get_classifier()``; None: no head; or module names).
    - Norm layers stay trainable (task-specific). Every other parameter, the wrapped layers'
      biases included, is frozen: it is part of the shared base, as TAPS defines a task as the
      scores, the open deltas, the norm layers and the head.

    Layers whose forward does not go through their weight as nn.Linear/nn.Conv2d's does are
    skipped and logged with the reason (e.g. timm's StdConv2d, nn.MultiheadAttention's out_proj).
    Returns the model (a new TAPS layer if ``model`` itself is a bare Linear/Conv2d).
    """
    check_threshold(threshold, "convert: threshold", finite=True)
    check_threshold(init_score, "convert: init_score")
    heads = resolve_head(model, head)
    inc, exc = _as_list(include), _as_list(exclude)
    parents = dict(model.named_modules())
    used = {p: False for p in inc + exc}

    def matches(name: str, pats: List[str]) -> bool:
        hit = [p for p in pats if fnmatch.fnmatchcase(name, p)]
        for p in hit:
            used[p] = True
        return bool(hit)

    mapping: Dict[int, nn.Module] = {}
    wrapped: List[str] = []
    skipped: Dict[str, str] = {}
    n_params = 0
    head_hits = set()
    for name, m in model.named_modules():
        if isinstance(m, TAPS_LAYERS) or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if _within(name, heads):
            head_hits.update(p for p in inc if fnmatch.fnmatchcase(name, p))
            continue
        if inc and not matches(name, inc):
            continue
        if matches(name, exc):
            continue
        why = _why_not_convertible(name, m, parents)
        if why is not None:
            skipped[name or "<root>"] = why
            continue
        cls = TAPSLinear if isinstance(m, nn.Linear) else TAPSConv2d
        mapping[id(m)] = cls.from_module(m, threshold=threshold, init_score=init_score)
        wrapped.append(name or "<root>")
        n_params += m.weight.numel()
    for p, hit in used.items():
        if not hit:
            kind = "include" if p in inc else "exclude"
            if p in head_hits:
                raise ValueError(f"convert: include pattern {p!r} matches only the classifier head {heads}, "
                                 "which is never wrapped (pass head=None to gate it)")
            raise ValueError(f"convert: {kind} pattern {p!r} matched no nn.Linear/nn.Conv2d module of "
                             f"{type(model).__name__}")
    already = sum(1 for _ in taps_layers(model))
    if not mapping and not already:
        extra = f" ({len(skipped)} skipped: {skipped})" if skipped else ""
        raise ValueError(f"convert: found no nn.Linear or nn.Conv2d to wrap in {type(model).__name__} "
                         f"(include={include!r}, exclude={exclude!r}, head={heads}){extra}")
    if id(model) in mapping:  # a bare layer: it cannot be replaced in place
        return mapping[id(model)]
    _replace_modules(model, mapping)
    model._taps_head = heads

    # Freeze the shared base; keep the task's parameters trainable.
    norm_keys, head_keys = task_state_keys(model)
    task = set(norm_keys) | set(head_keys)
    new = {id(m) for m in mapping.values()}
    for lname, layer in taps_layers(model):
        pre = lname + "." if lname else ""
        if id(layer) in new:
            task |= {pre + "delta", pre + "score"}
        else:  # converted earlier: leave its gate state (e.g. frozen gates) as it is
            task |= {pre + k for k, p in layer.named_parameters(recurse=False) if p.requires_grad}
    frozen = 0
    for pname, p in model.named_parameters():
        trainable = pname in task
        if not trainable and p.requires_grad:
            frozen += p.numel()
        p.requires_grad_(trainable)
    log.info("taps_fast.convert: wrapped %d layers (%d parameters) of %s; head %s trainable; "
             "froze %d other base parameters", len(wrapped), n_params, type(model).__name__,
             heads or "(none)", frozen)
    for name, why in skipped.items():
        log.warning("taps_fast.convert: skipped %s: %s", name, why)
    return model


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model for single-task deployment: each TAPS layer becomes the nn.Linear / nn.Conv2d
    it came from, with W + ΔW folded in where the gate is open and W where it is closed.
    ``inplace=False`` (default) leaves ``model`` untouched and returns a copy.

    Precision: W + ΔW is formed once, in the layer's dtype (rounded once), exactly as the
    "reference" backend forms it on every call, and the merged layers run torch's own F.linear /
    F.conv2d. So the merged model's outputs equal the TAPS model's bit for bit wherever the TAPS
    model runs the reference path on the same batch: on the CPU every conv, and every linear
    called with more than 32 rows (every call without the compiled extension). Elsewhere they
    agree within a few units in the last place of the layer dtype (tests/helpers.py's RTOL; for
    outputs that cancel, relative to Σ|x|·|W + ΔW|), not bitwise. The compiled few-row kernels
    ("cpp": at most 32 rows on the CPU; "cuda": at most 16) and the Triton kernels sum in another
    order, and in fp16/bf16 the compiled kernels keep W + ΔW in fp32 where merge rounds it to the
    layer dtype. docs/precision.md gives the contract for every backend and path."""
    if not inplace:
        model = copy.deepcopy(model)
    mapping: Dict[int, nn.Module] = {}
    for name, layer in taps_layers(model):
        base = nn.Linear if isinstance(layer, TAPSLinear) else nn.Conv2d
        attrs = ("in_features", "out_features") if base is nn.Linear else TAPSConv2d._ATTRS
        plain = base.__new__(base)
        nn.Module.__init__(plain)
        for a in attrs:
            setattr(plain, a, getattr(layer, a))
        w = layer.weight
        if layer.delta is not None and gate_is_open(layer.score, layer.threshold, f"merge: layer {name!r}"):
            w = nn.Parameter((layer.weight + layer.delta).detach(), requires_grad=layer.weight.requires_grad)
        plain.weight = w
        plain.bias = layer.bias
        plain.train(layer.training)
        mapping[id(layer)] = plain
    if not mapping:
        raise ValueError(f"merge: {type(model).__name__} has no TAPS layers (convert it first)")
    if id(model) in mapping:
        return mapping[id(model)]
    _replace_modules(model, mapping)
    return model
