"""Kernel providers at the ViT-B/16 projection shapes (pytest-benchmark).

Run: ``python -m pytest benchmarks/test_bench_kernels.py --benchmark-only``. The providers are those
of ``taps-fast bench --suite kernels`` (taps_fast/bench/kernels.py, which also reports TFLOP/s,
GB/s and the fraction of the machine's ceilings): ``floor`` (plain F.linear with a full weight
gradient), ``authors`` (materialise W + I·ΔW, autograd), ``authors-compiled`` (torch.compile of
that; CUDA only), ``taps`` (the dispatcher's backend: Triton on CUDA, the reference path on the
CPU). Each (N, K) is one benchmark group. M = 64·197 rows on CUDA in bf16; 197 rows (batch 1) in
fp32 on the CPU so the file runs in about a minute.
"""
from __future__ import annotations

import pytest
import torch

from taps_fast.bench import kernels as bk

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
M = (64 if CUDA else 1) * bk.TOKENS
PROVIDERS = ["floor", "authors", "taps"] + (["authors-compiled"] if CUDA else [])
bench = pytest.mark.benchmark(min_rounds=5, max_time=0.5 if not CUDA else 1.0, warmup=True, warmup_iterations=2)

if CUDA:  # time the kernels, not the host: one synchronize per round
    def _sync(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run
else:
    def _sync(fn):
        return fn


@bench
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nk", bk.VIT_NK, ids=[f"N{n}xK{k}" for n, k in bk.VIT_NK])
def test_vit_linear_fwd_bwd(benchmark, nk, provider):
    n, k = nk
    benchmark.group = f"vit-b linear M={M} N={n} K={k} fwd+bwd {DEV.type} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(provider=provider, M=M, N=n, K=k)
    fn = bk.linear_providers(M, n, k, DTYPE, DEV, True, provider == "authors-compiled")[provider]
    benchmark(_sync(fn))
