"""Mixed-batch benchmarks (pytest-benchmark), CPU float32 inference: one batch over T tasks.

Run: ``python -m pytest benchmarks --benchmark-only``. Small models so the file stays around a
minute on 2 cores; ``taps-fast bench --suite multitask`` runs the full sizes (ResNet-50 at
160 px, ViT-S/16 at 224 px, batch 32, T = 16) with weight bytes and peak RSS. Providers (see
taps_fast/bench/multitask.py): ``peft`` (loop over the tasks present, materialising each task's
weights per call), ``merged`` (loop over T merged model copies), ``base`` (the base model alone:
the floor), ``taps`` (MultiTaskModel). Each model is one group: the relative column is the ratio
to the fastest provider (normally ``base``).
"""
from __future__ import annotations

import pytest
import torch

from taps_fast.bench import multitask as bm

bench = pytest.mark.benchmark(min_rounds=3, max_time=1.0, warmup=True, warmup_iterations=1)
CASES = {"resnet18": 96, "vit_tiny_patch16_224": 224}
B, T = 16, 8


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mt_tasks")
    out = {}
    for arch, res in CASES.items():
        bm.RESOLUTION[arch] = res
        out[arch] = bm.write_tasks(arch, T, 0.25, str(folder))
    return out


@bench
@pytest.mark.parametrize("provider", bm.PROVIDERS)
@pytest.mark.parametrize("arch", list(CASES))
def test_mixed_batch(benchmark, task_files, arch, provider):
    benchmark.group = f"multitask {arch} batch {B} T={T}"
    _, run = bm.build(provider, arch, task_files[arch], torch.device("cpu"), torch.float32)
    x, ids = bm.batch(arch, B, T, "cpu", torch.float32)
    with torch.inference_mode():
        benchmark(run, x, ids)
