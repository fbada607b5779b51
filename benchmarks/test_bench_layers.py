"""Layer-level benchmarks (pytest-benchmark), CPU float32, forward + backward of one layer.

Run: ``python -m pytest benchmarks --benchmark-only``. Each layer is one benchmark group, so the
table's relative column reads as the ratio to the fastest provider (normally ``plain``):

- ``plain``: nn.Linear / nn.Conv2d with a full weight gradient: the floor;
- ``authors``: taps_linear_ref / taps_conv2d_ref, the authors' style (materialise W + g·ΔW every
  call, then autograd);
- ``taps``: TAPSLinear / TAPSConv2d with the gate open;
- ``taps-closed``: the same with the gate closed (score 0.05 < threshold 0.1).

The input requires a gradient in every provider, as for a layer inside a network.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import taps_fast
from taps_fast.bench.models import CLOSED_SCORE  # below the default threshold 0.1: a closed gate

# Short runs: the whole file stays well under a minute on 2 cores.
bench = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=2)

LINEAR = dict(M=256, N=768, K=768)
CONV = dict(B=8, C=64, O=64, k=3, H=28, W=28)
PROVIDERS = ("plain", "authors", "taps", "taps-closed")


def _fill(layer) -> None:
    with torch.no_grad():
        layer.delta.normal_(0, 1e-3)


def _step(fwd, x, dy, params):
    """One forward + backward with a fixed upstream gradient; gradients are dropped afterwards."""

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        fwd(x).backward(dy)

    return run


def _case(provider: str, plain: nn.Module, taps: nn.Module, ref, x, dy):
    """The step of one provider: ``plain`` layer, ``taps`` layer (open or closed), or ``ref`` (the
    authors' style formula on the taps layer's tensors)."""
    if provider == "plain":
        return _step(plain, x, dy, list(plain.parameters()))
    _fill(taps)
    if provider == "taps-closed":
        with torch.no_grad():
            taps.score.fill_(CLOSED_SCORE)
    params = [p for p in taps.parameters() if p.requires_grad]
    return _step(ref if provider == "authors" else taps, x, dy, params)


def _linear_case(provider: str):
    torch.manual_seed(0)
    m, n, k = LINEAR["M"], LINEAR["N"], LINEAR["K"]
    x = torch.randn(m, k, requires_grad=True)
    dy = torch.randn(m, n)
    t = taps_fast.TAPSLinear(k, n)
    ref = lambda x: taps_fast.taps_linear_ref(x, t.weight, t.delta, t.score, t.bias, t.threshold)  # noqa: E731
    return _case(provider, nn.Linear(k, n), t, ref, x, dy)


def _conv_case(provider: str):
    torch.manual_seed(0)
    c = CONV
    x = torch.randn(c["B"], c["C"], c["H"], c["W"], requires_grad=True)
    dy = torch.randn(c["B"], c["O"], c["H"], c["W"])  # padding 1 keeps 28x28
    t = taps_fast.TAPSConv2d(c["C"], c["O"], c["k"], padding=1)
    ref = lambda x: taps_fast.taps_conv2d_ref(x, t.weight, t.delta, t.score, t.bias, t.stride,  # noqa: E731
                                              t.padding, t.dilation, t.groups, t.threshold)
    return _case(provider, nn.Conv2d(c["C"], c["O"], c["k"], padding=1), t, ref, x, dy)


# layer -> (benchmark group, shape, case builder)
LAYERS = {
    "linear": ("linear M=256 N=K=768 fwd+bwd cpu fp32", LINEAR, _linear_case),
    "conv2d": ("conv2d B=8 64->64 3x3 28x28 fwd+bwd cpu fp32", CONV, _conv_case),
}


@bench
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_fwd_bwd(benchmark, layer, provider):
    group, shape, case = LAYERS[layer]
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, **shape)
    benchmark(case(provider))
