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
