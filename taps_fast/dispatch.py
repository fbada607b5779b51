"""Backend registry and dispatcher (the xformers pattern).

Each backend states, per op and per call, whether it can serve and if not why. The dispatcher tries
the backends in priority order and takes the first that fits; ``TAPS_FAST_BACKEND=<name>`` (or
:func:`use_backend`) forces one, and a forced backend that cannot serve fails with every backend's
reason. The order is that of taps_fast.ops.BACKENDS (:func:`backend_names` lists it).

A backend's ``why_not`` also receives ``forced`` (whether it was forced), so a backend can serve
a device only on request: the triton backend serves CPU tensors under TRITON_INTERPRET=1 (its
test mode) only when forced, leaving the reference path the CPU default.

Dispatch happens inside the custom ops' real kernels, at run time, so it is invisible to
torch.compile (the fake kernels do not depend on the backend).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

OPS = ("linear_fwd", "linear_bwd", "conv2d_fwd", "conv2d_bwd",
       "mt_linear_fwd", "mt_linear_bwd", "mt_conv2d_fwd", "mt_conv2d_bwd")
ENV_VAR = "TAPS_FAST_BACKEND"


@dataclass
class Backend:
    """A set of kernels. ``why_not(op, **meta)`` returns None when it can serve the call, else a
    short reason; ``meta`` carries at least ``device`` (torch.device) and ``dtype``."""

    name: str
    kernels: Dict[str, Callable] = field(default_factory=dict)
    why_not: Callable[..., Optional[str]] = lambda op, **meta: None
    available: Callable[[], Optional[str]] = lambda: None  # None, or why it is not installed

    def reason(self, op: str, forced: bool = False, **meta) -> Optional[str]:
        missing = self.available()
        if missing is not None:
            return missing
        if op not in self.kernels:
            return f"has no {op} kernel"
        return self.why_not(op, forced=forced, **meta)


_REGISTRY: List[Backend] = []
_forced: List[Optional[str]] = [None]


class NoBackendError(RuntimeError):
    pass


def register_backend(backend: Backend, priority: Optional[int] = None) -> None:
    """Register a backend at list position ``priority`` (tried in list order; default: just
    before the reference backend)."""
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    if priority is None:  # ahead of "reference", the fallback that serves everything
        names = backend_names()
        priority = names.index("reference") if "reference" in names else len(names)
    _REGISTRY.insert(priority, backend)


def backends() -> List[Backend]:
    return list(_REGISTRY)


def backend_names() -> List[str]:
    return [b.name for b in _REGISTRY]


def forced_backend() -> Optional[str]:
    name = _forced[0] or os.environ.get(ENV_VAR) or None
    if name is not None and name not in backend_names():
        raise NoBackendError(
            f"unknown taps_fast backend {name!r} (from {'use_backend' if _forced[0] else ENV_VAR}); "
            f"known: {', '.join(backend_names())}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend inside a ``with`` block (None: automatic choice)."""
    old = _forced[0]
    _forced[0] = name
    try:
        forced_backend()  # validate the name now, not at the first op
        yield
    finally:
        _forced[0] = old


def reasons(op: str, **meta) -> Dict[str, Optional[str]]:
    """Every backend's answer for this call: None (can serve) or the reason it cannot. A forced
    backend is asked as forced, the others as for an automatic choice."""
    forced = forced_backend()
    return {b.name: b.reason(op, forced=b.name == forced, **meta) for b in _REGISTRY}


def select(op: str, **meta) -> Backend:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    forced = forced_backend()
    candidates = [b for b in _REGISTRY if forced is None or b.name == forced]
    for b in candidates:
        if b.reason(op, forced=forced is not None, **meta) is None:
            return b
    lines = "; ".join(f"{n}: {r or 'ok'}" for n, r in reasons(op, **meta).items())
    head = f"backend {forced!r} (forced) cannot serve" if forced else "no backend can serve"
    desc = ", ".join(f"{k}={v}" for k, v in meta.items())
    raise NoBackendError(f"{head} taps_fast {op} ({desc}): {lines}")

