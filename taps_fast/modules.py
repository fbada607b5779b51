"""Drop-in TAPS layers: thin nn.Modules that only call the functional ops.

``TAPSLinear`` is an nn.Linear and ``TAPSConv2d`` an nn.Conv2d (isinstance holds, every argument
of the parent is accepted), with a frozen base ``weight``, a zero-initialised task ``delta`` of
the same shape, a 0-dim ``score`` and a ``threshold`` τ. The layer computes with
W + 1[score ≥ τ]·ΔW; see taps_fast/ops/linear.py for the math and the gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import taps_conv2d, taps_linear
from .ops._common import check_threshold

DEFAULT_THRESHOLD = 0.1
DEFAULT_INIT_SCORE = 0.15


class _TAPSMixin:
    """What both layers share: the gate parameters, from_module, repr."""

    weight: nn.Parameter
    delta: Optional[nn.Parameter]
    score: nn.Parameter
    _threshold: float

    def _init_taps(self, threshold: float, init_score: float) -> None:
        check_threshold(init_score, type(self).__name__ + " init_score")
        self.threshold = threshold
        self.weight.requires_grad_(False)  # the shared pretrained base stays frozen
        self.delta = nn.Parameter(torch.zeros_like(self.weight))
        self.score = nn.Parameter(torch.tensor(float(init_score), dtype=self.weight.dtype,
                                               device=self.weight.device))

    @property
    def threshold(self) -> float:
        """τ of the gate 1[score ≥ τ]: a finite real number (checked whenever it is set)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        check_threshold(value, type(self).__name__, finite=True)
        self._threshold = float(value)

    # The threshold is part of the state_dict (``<layer>._extra_state``, a 0-dim float64 tensor, so
    # that safetensors can hold it too): a state_dict loaded into a model converted with another τ
    # restores the τ its gates were trained at instead of silently reopening or closing them.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.threshold, dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        if isinstance(state, Tensor) and state.dim() == 0 and state.is_floating_point():
            state = float(state)
        if not isinstance(state, float):
            raise ValueError(f"{type(self).__name__}: the saved threshold must be a 0-dim float tensor, "
                             f"got {state!r}")
        self.threshold = state

    @property
    def is_open(self) -> bool:
        """Whether the gate 1[score ≥ threshold] is open (the delta is in use)."""
        return bool(self.score.detach() >= self.threshold)

    @classmethod
    def _from_module(cls, m: nn.Module, attrs, threshold: float, init_score: float):
        if not isinstance(m, cls._BASE):
            raise TypeError(f"{cls.__name__}.from_module expects an {cls._BASE.__name__}, got {type(m).__name__}")
        if isinstance(m, cls):
            raise TypeError(f"{cls.__name__}.from_module: the module is already a {cls.__name__}")
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{cls.__name__}.from_module: {type(m).__name__} has uninitialized (lazy) "
                             "parameters; run one forward pass first")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for a in attrs:
            setattr(new, a, getattr(m, a))
        new.weight = m.weight  # the same Parameter objects: nothing is copied
        new.bias = m.bias
        new.train(m.training)
        # Hooks registered on the wrapped layer keep firing on its replacement.
        for h in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                  "_backward_pre_hooks"):
            if hasattr(m, h):
                getattr(new, h).update(getattr(m, h))
        new._init_taps(threshold, init_score)
        return new

    def _tensors(self):
        """(weight, delta, score, bias), read from _parameters directly: nn.Module.__getattr__
        costs 0.5 µs a read, a tenth of a small layer's call. A parametrized layer
        (torch.nn.utils.parametrize), whose weight is a computed attribute, reads attributes."""
        p = self._parameters
        try:
            return p["weight"], p["delta"], p["score"], p["bias"]
        except KeyError:
            return self.weight, self.delta, self.score, self.bias

    def _taps_repr(self) -> str:
        s = self.score.detach()
        state = "open" if self.is_open else "closed"
        delta = "" if self.delta is not None else ", delta=dropped"
        return f", threshold={self.threshold}, score={float(s):.4g} ({state}){delta}"


class TAPSLinear(_TAPSMixin, nn.Linear):
    """nn.Linear computing y = x·(W + 1[s ≥ τ]·ΔW)ᵀ + b.

    Args: nn.Linear's (in_features, out_features, bias, device, dtype), plus keyword-only
    ``threshold`` (τ, default 0.1) and ``init_score`` (default 0.15: the gate starts open).
    """

    _BASE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, threshold: float = DEFAULT_THRESHOLD, init_score: float = DEFAULT_INIT_SCORE) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_taps(threshold, init_score)

    @classmethod
    def from_module(cls, m: nn.Linear, threshold: float = DEFAULT_THRESHOLD,
                    init_score: float = DEFAULT_INIT_SCORE) -> "TAPSLinear":
        """Wrap ``m``, reusing its weight and bias Parameters (no copy); the weight is frozen."""
        return cls._from_module(m, ("in_features", "out_features"), threshold, init_score)

    def forward(self, x: Tensor) -> Tensor:
        weight, delta, score, bias = self._tensors()
        return taps_linear(x, weight, delta, score, bias, self._threshold)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._taps_repr()


class TAPSConv2d(_TAPSMixin, nn.Conv2d):
    """nn.Conv2d computing conv2d(x, W + 1[s ≥ τ]·ΔW) + b, with every nn.Conv2d option
    (stride, padding ints/tuples/'same'/'valid', padding_mode, dilation, groups, bias).

    Args: nn.Conv2d's, plus keyword-only ``threshold`` and ``init_score``.
    """

    _BASE = nn.Conv2d
    _ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "transposed", "output_padding", "groups", "padding_mode",
              "_reversed_padding_repeated_twice")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, threshold: float = DEFAULT_THRESHOLD, init_score: float = DEFAULT_INIT_SCORE) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_taps(threshold, init_score)

    @classmethod
    def from_module(cls, m: nn.Conv2d, threshold: float = DEFAULT_THRESHOLD,
                    init_score: float = DEFAULT_INIT_SCORE) -> "TAPSConv2d":
        """Wrap ``m``, reusing its weight and bias Parameters (no copy); the weight is frozen."""
        return cls._from_module(m, cls._ATTRS, threshold, init_score)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward: pad, then a 'valid' conv
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        weight, delta, score, bias = self._tensors()
        return taps_conv2d(x, weight, delta, score, bias, self.stride, padding, self.dilation, self.groups,
                           self._threshold)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._taps_repr()


TAPS_LAYERS = (TAPSLinear, TAPSConv2d)
