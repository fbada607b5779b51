"""Backend registry and dispatcher (the xformers pattern).

Each backend states, per op and per call, whether it can serve and if not why. The dispatcher tries
the backends in priority order and takes the first that fits; ``TAPS_FAST_BACKEND=<name>`` (or
:func:`use_backend`) forces one, and a forced backend that cannot serve fails with every backend's
reason. The order is that of taps_fast.ops.BACKENDS (:func:`backend_names` lists it).

A backend's ``why_not`` also receives ``forced`` (whether it was forced), so a backend can serve
a device only on request: the triton backend serves CPU tensors under TRITON_INTERPRET=1 (its
test mode) only when forced, leaving the reference path the CPU default.

Dispatch happens inside the custom ops' real kernels (and the eager paths), at run time, so it is
invisible to torch.compile (the fake kernels do not depend on the backend).

Choices are cached. A choice depends on the op, the call's metadata, the forced backend, the
environment variables and the torch flags backends read (TAPS_FAST_BACKEND, TAPS_FAST_DISABLE,
TRITON_INTERPRET, and on CUDA the TF32 flags) and on the registry: the cache key holds all of them but the registry,
whose changes clear it, so a changed flag or variable takes effect at the next call. A cached
choice costs 1.6 µs through select() and 0.4 µs through select_cached() (the ops' own calls)
against 7.9 µs for asking every backend (2-core x86_64, no GPU, torch 2.14.1), a call of
nn.Linear on a 64x64 layer taking 5.7 µs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

OPS = ("linear_fwd", "linear_bwd", "conv2d_fwd", "conv2d_bwd",
       "mt_linear_fwd", "mt_linear_bwd", "mt_conv2d_fwd", "mt_conv2d_bwd")
ENV_VAR = "TAPS_FAST_BACKEND"
# A comma-separated list of backends never to use, e.g. TAPS_FAST_DISABLE=cuda on a GPU whose
# compiled kernels misbehave: every other backend still serves, in its usual order.
DISABLE_VAR = "TAPS_FAST_DISABLE"


@dataclass
class Backend:
    """A set of kernels. ``why_not(op, **meta)`` returns None when it can serve the call, else a
    short reason; ``meta`` carries at least ``device`` (torch.device) and ``dtype``."""

    name: str
    kernels: Dict[str, Callable] = field(default_factory=dict)
    why_not: Callable[..., Optional[str]] = lambda op, **meta: None
    available: Callable[[], Optional[str]] = lambda: None  # None, or why it is not installed

    def reason(self, op: str, forced: bool = False, **meta) -> Optional[str]:
        if self.name in disabled_backends():
            return f"disabled by {DISABLE_VAR}"
        missing = self.available()
        if missing is not None:
            return missing
        if op not in self.kernels:
            return f"has no {op} kernel"
        return self.why_not(op, forced=forced, **meta)


_REGISTRY: List[Backend] = []
_forced: List[Optional[str]] = [None]
_CHOICES: Dict[tuple, Backend] = {}  # the cache of select(): key -> backend
_CACHE_LIMIT = 4096  # distinct keys kept (a key per op, dtype, device, shape class...)


def _env_reader(name: str) -> Callable[[], Optional[str]]:
    """A reader of one environment variable. os.environ.get costs 0.8 µs (it encodes the key
    each time); where os.environ is backed by a dict of encoded keys (POSIX CPython), that dict
    is read directly (0.1 µs); every write through os.environ updates it."""
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if isinstance(data, dict) and callable(encode) and callable(decode):
        key = encode(name)

        def read() -> Optional[str]:
            v = data.get(key)
            return None if v is None else decode(v)
        return read
    return lambda: os.environ.get(name)


_env_backend = _env_reader(ENV_VAR)
_env_interpret = _env_reader("TRITON_INTERPRET")
_env_disable = _env_reader(DISABLE_VAR)


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
    _CHOICES.clear()


def unregister_backend(name: str) -> None:
    """Remove the backend called ``name`` (and every cached choice)."""
    _REGISTRY[:] = [b for b in _REGISTRY if b.name != name]
    _CHOICES.clear()


def backends() -> List[Backend]:
    return list(_REGISTRY)


def backend_names() -> List[str]:
    return [b.name for b in _REGISTRY]


def disabled_backends() -> frozenset:
    """The backends named in TAPS_FAST_DISABLE (comma-separated); an unknown name is refused."""
    names = frozenset(n.strip() for n in (_env_disable() or "").split(",") if n.strip())
    unknown = sorted(names - set(backend_names()))
    if unknown:
        raise NoBackendError(f"unknown taps_fast backend(s) {', '.join(map(repr, unknown))} in "
                             f"{DISABLE_VAR}; known: {', '.join(backend_names())}")
    return names


def forced_backend() -> Optional[str]:
    name = _forced[0] or _env_backend() or None
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


def _tf32_flags() -> tuple:
    """The torch flags a backend's answer may depend on off the CPU: the TF32 switches."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def select(op: str, **meta) -> Backend:
    """The first backend (in priority order; only the forced one if one is forced) that can
    serve this call. Cached (module docstring), through select_cached with the metadata's items
    as the key; raises NoBackendError listing every backend's reason when none can."""
    device = meta.get("device")
    key = (getattr(device, "type", device) == "cpu", *meta.items())
    try:
        return select_cached(op, key, lambda: meta)
    except TypeError:  # unhashable metadata: choose without the cache
        return _select(op, meta)


def select_cached(op: str, key: tuple, make_meta: Callable[[], dict]) -> Backend:
    """select() for the ops' hot paths: ``key`` is a tuple of plain values that determines the
    call's metadata, ``(is_cpu, ...)`` with the device among the rest when not on the CPU, and
    ``make_meta()`` builds that metadata, only when the choice is not cached yet. Building the
    metadata dict and select()'s key costs 2.1 µs a call of a small layer against 0.9 µs for the
    tuple and this lookup (2-core x86_64, no GPU, torch 2.14.1). The cache: module docstring."""
    k = (op, _forced[0], _env_backend(), _env_interpret(), _env_disable(), key)
    if not key[0]:  # not the CPU: the TF32 switches may change the answer (CUDA)
        k = k + (_tf32_flags(),)
    backend = _CHOICES.get(k)
    if backend is None:
        backend = _select(op, make_meta())
        if len(_CHOICES) >= _CACHE_LIMIT:
            _CHOICES.clear()
        _CHOICES[k] = backend
    return backend


def _select(op: str, meta: dict) -> Backend:
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
