"""The optional compiled extension ``taps_fast._C`` (csrc/).

Imported lazily; when it is missing (not built, or built for another torch) the package works on
its Triton and PyTorch backends and says so once, at INFO level, on the "taps_fast" logger.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

log = logging.getLogger("taps_fast")


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[object], Optional[str]]:
    """(module, None) when the extension loads, else (None, why not)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        why = f"taps_fast._C is not available ({e}); falling back to the other backends"
        log.info(why)
        return None, why
    return _C, None
