"""What taps_fast can run here: ``python -m taps_fast.info`` (or ``taps-fast info``).

Prints the versions (taps_fast, torch, triton, timm, python), CUDA and the device, TRITON_INTERPRET,
whether the compiled extension loaded and what it contains (the C++ CPU kernels; the CUDA kernels
and their GPU architectures, or why they were not built), and for every op and backend whether it serves this
machine's default device in float32 / float16 / bfloat16 and, if not, why; then which backend
the dispatcher selects. ``--kernels`` runs the static GPU check instead (checks/triton_sass.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional, Sequence, Tuple

import torch

SHOWN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else
        return "not installed" if isinstance(e, ImportError) else f"not importable ({type(e).__name__}: {e})"
    return str(getattr(mod, "__version__", "unknown version"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def report(device: Optional[torch.device] = None) -> str:
    """The whole report as text."""
    import taps_fast
    from taps_fast import _ext, dispatch
    from taps_fast.ops.ext_backend import CPP_MAX_ROWS, CUDA_MAX_ROWS, SERVING_ROWS

    device = device or default_device()
    lines: List[str] = []
    kv: List[Tuple[str, str]] = [
        ("taps_fast", taps_fast.__version__),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("timm", _version("timm")),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("cpu count", f"{os.cpu_count()} (torch threads: {torch.get_num_threads()})"),
    ]
    if torch.cuda.is_available():
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                          for i in range(torch.cuda.device_count()))
        kv.append(("CUDA", f"available, torch built with CUDA {torch.version.cuda}; {names}"))
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        kv.append(("CUDA", f"not available ({built})"))
    kv.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "(unset)")))
    kv.append((dispatch.ENV_VAR, os.environ.get(dispatch.ENV_VAR, "(unset)")))
    kv.append((dispatch.DISABLE_VAR, os.environ.get(dispatch.DISABLE_VAR, "(unset)")))
    mod, why = _ext.load()
    if mod is not None:
        bi = _ext.build_info()
        kv.append(("compiled extension", f"loaded ({getattr(mod, '__file__', mod)}), built against torch {bi.get('torch')}"))
        archs = ", ".join(f"sm_{a}{b}" + ("+PTX" if p else "") for a, b, p in _ext.cuda_archs())
        kv.append(("  C++ CPU kernels", "built (backend 'cpp')"))
        kv.append(("  CUDA kernels", f"built for {archs} (backend 'cuda')" if bi.get("cuda")
                   else "not built (no nvcc or a CPU-only torch at build time, or TAPS_FAST_NO_CUDA=1)"))
    else:
        kv.append(("compiled extension", f"not loaded: {why}"))
    kv.append(("backends", ", ".join(dispatch.backend_names()) + " (in priority order)"))
    w = max(len(k) for k, _ in kv)
    lines += [f"{k:<{w}}  {v}" for k, v in kv]

    lines.append("")
    lines.append(f"ops on {device} (groups=1, M={SERVING_ROWS} rows: the compiled kernels serve up to {CUDA_MAX_ROWS} "
                 f"rows ('cuda') / {CPP_MAX_ROWS} ('cpp')): 'ok' = the backend serves the call")
    rows = [("op", "backend") + tuple(_dtype_name(d) for d in SHOWN_DTYPES)]
    for op in dispatch.OPS:
        per = {d: dispatch.reasons(op, device=device, dtype=d, groups=1, rows=SERVING_ROWS) for d in SHOWN_DTYPES}
        for name in dispatch.backend_names():
            rows.append((op, name) + tuple(per[d].get(name) or "ok" for d in SHOWN_DTYPES))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())

    lines.append("")
    lines.append("selected backend:")
    try:
        forced = dispatch.forced_backend()
    except dispatch.NoBackendError as e:
        forced = None
        lines.append(f"  {e}")
    if forced:
        lines.append(f"  forced: {forced}")
    for op in dispatch.OPS:
        sel = []
        for d in SHOWN_DTYPES:
            try:
                sel.append(f"{_dtype_name(d)}: {dispatch.select(op, device=device, dtype=d, groups=1, rows=SERVING_ROWS).name}")
            except dispatch.NoBackendError:
                sel.append(f"{_dtype_name(d)}: none")
        lines.append(f"  {op:<{max(map(len, dispatch.OPS))}}  " + ", ".join(sel))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taps_fast.info",
                                description="Print what taps_fast can run on this machine.")
    p.add_argument("--device", default=None, help="device to report on (default: cuda if available, else cpu)")
    p.add_argument("--kernels", action="store_true",
                   help="static GPU check instead: compile every Triton kernel for sm_80/sm_90 at every "
                        "autotune config and report registers, shared/local memory and HGMMA use; "
                        "exits 1 on a spill or a matmul without HGMMA on sm_90 (needs no GPU)")
    p.add_argument("--dtypes", default=None, help="with --kernels: fp16,bf16,tf32 (default: all three)")
    p.add_argument("--archs", default=None, help="with --kernels: e.g. 80,90 (the default)")
    args = p.parse_args(argv)
    if args.kernels:
        from .checks import triton_sass

        extra = (["--dtypes", args.dtypes] if args.dtypes else []) + (["--archs", args.archs] if args.archs else [])
        return triton_sass.main(extra)
    device = torch.device(args.device) if args.device else None
    print(report(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
