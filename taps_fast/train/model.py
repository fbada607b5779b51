"""The model a training run adapts: a timm model with pretrained weights, prepared for one
method (``taps``: convert and train deltas, scores, norms and head; ``full``: every parameter;
``head``: the classifier alone, norms frozen in eval mode)."""
from __future__ import annotations

import logging
from typing import List, Optional

import torch.nn as nn

from ..convert import convert, is_norm, resolve_head

log = logging.getLogger(__name__)

METHODS = ("taps", "full", "head")


def create_base(name: str, num_classes: int, pretrained: bool = False, pretrained_path: Optional[str] = None,
                drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """timm ``name`` with a fresh ``num_classes`` head; weights from timm's own loading
    (``pretrained``) or a local file / ``package:`` name (``pretrained_path``)."""
    import timm

    kw = {"drop_rate": drop_rate}
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {name!r}") from None
        raise
    if pretrained_path:
        from ..pretrained import load_pretrained

        load_pretrained(model, pretrained_path)
    elif not pretrained:
        log.warning("%s: no pretrained weights (--pretrained / --pretrained-path): training from a random init", name)
    return model


def prepare(model: nn.Module, method: str, threshold: float, init_score: float,
            include: Optional[List[str]] = None, exclude: Optional[List[str]] = None) -> nn.Module:
    if method == "taps":
        return convert(model, include=include, exclude=exclude, threshold=threshold, init_score=init_score)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "head":
        heads = resolve_head(model)
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") for h in heads))
        return model
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def set_train_mode(model: nn.Module, method: str, training: bool) -> None:
    """model.train(training); head-only training keeps the (frozen) norms in eval mode, so their
    running statistics stay the pretrained ones."""
    model.train(training)
    if training and method == "head":
        for m in model.modules():
            if is_norm(m):
                m.eval()
