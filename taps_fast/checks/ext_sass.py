"""Static check of the compiled extension's CUDA kernels: ``python -m taps_fast.checks ext [SO]``
(or ``python -m taps_fast.ext_check [SO]``).

Reads the built ``taps_fast._C`` with ``cuobjdump`` (no GPU needed) and reports, per kernel
function whose name contains ``_taps_small`` and per architecture (sm_80, sm_90, ...): registers
per thread, stack and local bytes (spills), static shared memory, and whether its SASS has 128-bit
global loads (``LDG.E[...].128``, the 16-byte vector loads the memory-bound small-M kernels are
built on). Exit status of :func:`main`: 0 all good; 1 some kernel spills (stack or local > 0) or
lacks 128-bit loads; 2 the extension has no CUDA part, or cuobjdump cannot be found.

The unaligned fallbacks (``*_scalar_kernel``: pointers not 16-byte aligned, or K·elem % 16 != 0)
load one element at a time by design, so they are exempt from the 128-bit requirement (their row
says so) but not from the spill check.

cuobjdump is looked up next to the triton package (triton/backends/nvidia/bin/cuobjdump), then on
PATH, then in $CUDA_HOME/bin (:func:`taps_fast.checks._cuobjdump.find_cuobjdump`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from ._cuobjdump import NOT_FOUND, find_cuobjdump, parse_res_usage, parse_sass, run_cuobjdump

KERNEL_TAG = "_taps_small"
FALLBACK_TAG = "_scalar_kernel"  # one-element loads by design (unaligned inputs)
_LDG128 = re.compile(r"\bLDG\.E[\w.]*?\.128\b")


def row_ok(r: dict) -> bool:
    """No stack or local memory (spills), and 128-bit loads unless the kernel is a fallback."""
    return r["stack"] == 0 and r["local"] == 0 and (r["ldg128"] or not r["needs_ldg128"])


class ExtCheckError(RuntimeError):
    """The check cannot run: no cuobjdump, no extension file, or no CUDA code in it."""


def default_so_path() -> str:
    """The file of taps_fast._C (without importing it when find_spec can locate it)."""
    try:
        spec = importlib.util.find_spec("taps_fast._C")
    except ImportError as e:
        raise ExtCheckError(f"taps_fast._C cannot be located ({e})") from e
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return spec.origin
    try:
        from taps_fast import _C  # type: ignore[attr-defined]
    except ImportError as e:
        raise ExtCheckError(f"taps_fast._C is not built or not importable ({e})") from e
    return _C.__file__


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    """mangled -> demangled (c++filt when present; else the names unchanged)."""
    out = {n: n for n in names}
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return out
    try:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                             check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return out
    lines = res.stdout.splitlines()
    if len(lines) == len(names):
        out.update(zip(names, lines))
    return out


def _short(demangled: str) -> str:
    """'void ns::f<a, b>(args...)' -> 'f<a, b>'."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    for i, ch in enumerate(s):  # cut the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    return s.replace("taps_fast::", "")


def check(so_path: Optional[str] = None) -> List[dict]:
    """One dict per (kernel function containing "_taps_small", arch): name, mangled, arch,
    registers, stack, local, shared (bytes), ldg128 (bool), needs_ldg128 (False for the scalar
    fallbacks), ok. Raises ExtCheckError when the check cannot run (no cuobjdump, no file, or no
    CUDA kernels in the extension)."""
    so = so_path or default_so_path()
    if not os.path.isfile(so):
        raise ExtCheckError(f"no such file: {so}")
    if find_cuobjdump() is None:
        raise ExtCheckError(NOT_FOUND)
    res = run_cuobjdump(["-res-usage", so])
    sass = run_cuobjdump(["-sass", so])
    usage = {k: v for k, v in parse_res_usage(res.stdout).items() if KERNEL_TAG in k[1]}
    loads = {k: v for k, v in parse_sass(sass.stdout, _LDG128).items() if KERNEL_TAG in k[1]}
    if not usage:
        why = (res.stderr or sass.stderr).strip()
        raise ExtCheckError(f"{so} has no CUDA kernels named *{KERNEL_TAG}* (the extension was "
                            f"built without its CUDA part?){': ' + why if why else ''}")
    names = _demangle(sorted({k[1] for k in usage}))
    rows = []
    for (arch, mangled), u in sorted(usage.items(), key=lambda kv: (names[kv[0][1]], kv[0][0])):
        name = _short(names[mangled])
        needs = FALLBACK_TAG not in name
        ldg = loads.get((arch, mangled), False)
        stack, local = u.get("STACK", 0), u.get("LOCAL", 0)
        rows.append(dict(name=name, mangled=mangled, arch=arch, registers=u.get("REG", -1),
                         stack=stack, local=local, shared=u.get("SHARED", 0), ldg128=ldg,
                         needs_ldg128=needs,
                         ok=None))
        rows[-1]["ok"] = row_ok(rows[-1])
    return rows


def format_table(rows: List[dict]) -> str:
    w = max([len("kernel")] + [len(r["name"]) for r in rows])
    head = f"{'kernel':<{w}}  {'arch':<6} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}  {'LDG.128':<14} ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ldg = "yes" if r["ldg128"] else ("no (fallback)" if not r["needs_ldg128"] else "NO")
        lines.append(f"{r['name']:<{w}}  {r['arch']:<6} {r['registers']:>4} {r['stack']:>5} "
                     f"{r['local']:>5} {r['shared']:>6}  {ldg:<14} {'ok' if row_ok(r) else 'FAIL'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taps_fast.checks ext", description=__doc__.split("\n\n")[0])
    ap.add_argument("so", nargs="?", default=None, help="the extension file (default: taps_fast._C's)")
    args = ap.parse_args(argv)
    try:
        rows = check(args.so)
    except ExtCheckError as e:
        print(f"ext_check: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    bad = [r for r in rows if not row_ok(r)]
    spills = sum(1 for r in rows if r["stack"] or r["local"])
    no128 = sum(1 for r in rows if r["needs_ldg128"] and not r["ldg128"])
    print(f"\n{len(rows)} kernel instantiations ({len({r['arch'] for r in rows})} archs): "
          f"{spills} with stack/local memory, {no128} without 128-bit loads"
          + ("" if not bad else " -> FAIL"))
    return 1 if bad else 0
