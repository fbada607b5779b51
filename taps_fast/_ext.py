"""The optional compiled extension ``taps_fast._C`` (csrc/).

Loaded lazily, the first time a backend asks for it (``import taps_fast`` never loads it, so a
broken build cannot break the import). When it is missing (not built, built with
``TAPS_FAST_NO_EXT=1``, or built for another torch) the package works on its Triton and PyTorch
backends and says so once: one :class:`ExtensionNotLoadedWarning` line (filter it with the
warnings module) plus an INFO record on the "taps_fast" logger. ``python -m taps_fast.info``
shows what was built and for which GPU architectures.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Optional, Tuple

import torch

log = logging.getLogger("taps_fast")


class ExtensionNotLoadedWarning(UserWarning):
    """taps_fast._C could not be loaded; the Triton and PyTorch backends serve instead."""


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[object], Optional[str]]:
    """(module, None) when the extension loads, else (None, why not). Warns once when missing."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as e:  # ImportError, or OSError / undefined symbols from another torch build
        why = f"taps_fast._C is not available ({type(e).__name__}: {e})"
        log.info(why)
        warnings.warn(f"{why}; falling back to the Triton/PyTorch backends", ExtensionNotLoadedWarning,
                      stacklevel=2)
        return None, why
    built = _C.build_info().get("torch", "")
    if built.split("+")[0] != torch.__version__.split("+")[0]:  # the schema/ABI may differ: refuse
        why = f"taps_fast._C was built against torch {built}, but torch {torch.__version__} is running; rebuild it (pip install -e . --no-build-isolation)"
        log.info(why)
        warnings.warn(f"{why}; falling back to the Triton/PyTorch backends", ExtensionNotLoadedWarning,
                      stacklevel=2)
        return None, why
    _register_fakes()
    return _C, None


@functools.lru_cache(maxsize=None)  # asked on every dispatch; the loaded module never changes
def build_info() -> dict:
    """What the loaded extension contains ({} when it is not loaded): ``cuda`` (bool),
    ``cuda_archs`` (e.g. "8.0;9.0"), ``torch`` (the version it was built against)."""
    mod, _ = load()
    return dict(mod.build_info()) if mod is not None else {}


@functools.lru_cache(maxsize=None)
def cuda_archs() -> Tuple[Tuple[int, int, bool], ...]:
    """The GPU architectures the extension's CUDA kernels were built for, as (major, minor, ptx):
    "8.0;9.0+PTX" gives ((8, 0, False), (9, 0, True)), the second also embedding PTX, which the
    driver compiles for any newer GPU. () without a CUDA part."""
    out = []
    for a in build_info().get("cuda_archs", "").replace(" ", ";").split(";"):
        if a:
            num, _, ptx = a.partition("+")
            major, _, minor = num.partition(".")
            out.append((int(major), int(minor or 0), ptx.upper() == "PTX"))
    return tuple(out)


def cuda_arch_reason(capability: Tuple[int, int]) -> Optional[str]:
    """None when the built CUDA kernels run on a GPU of this compute capability, else why not: a
    cubin runs on its own major version at the same or a higher minor one, PTX on any GPU at or
    above its architecture (the driver compiles it at first use)."""
    archs = cuda_archs()
    major, minor = capability
    for a_major, a_minor, ptx in archs:
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return None
    built = ", ".join(f"sm_{a}{b}" + ("+PTX" if p else "") for a, b, p in archs) or "no GPU architecture"
    return (f"taps_fast._C's CUDA kernels are built for {built}, not for this GPU (sm_{major}{minor}); "
            f"rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}")


def _register_fakes() -> None:
    """Meta kernels for the C++ ops, so they trace under torch.compile and pass opcheck."""
    def small_linear_fake(x, weight, delta, score, bias, threshold):
        return x.new_empty((x.shape[0], weight.shape[0]))

    def small_mt_linear_fake(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    for name, fn in (("taps_fast::small_linear", small_linear_fake),
                     ("taps_fast::small_mt_linear", small_mt_linear_fake)):
        try:
            torch.library.register_fake(name, fn)
        except RuntimeError as e:  # already registered (a second load of the same process)
            if "already" not in str(e):
                raise
