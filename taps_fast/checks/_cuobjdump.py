"""cuobjdump, the one tool both static checks read compiled GPU code with (no GPU needed): where
it is, how it is run, and how its ``-res-usage`` and ``-sass`` listings are parsed."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from typing import Dict, Iterator, Optional, Sequence, Tuple

NOT_FOUND = ("cuobjdump not found (looked next to triton: triton/backends/nvidia/bin/cuobjdump, "
             "on PATH, and in $CUDA_HOME/bin)")


def _executable(path: str) -> Optional[str]:
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_cuobjdump() -> Optional[str]:
    """Triton's bundled cuobjdump, else the one on PATH, else $CUDA_HOME/bin/cuobjdump (None if
    none). Triton's comes first: it is the one that matches the cubins Triton writes."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        p = _executable(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
        if p:
            return p
    p = shutil.which("cuobjdump")
    if p:
        return p
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return _executable(os.path.join(home, "bin", "cuobjdump"))
    return None


def run_cuobjdump(args: Sequence[str], check: bool = False) -> subprocess.CompletedProcess:
    """cuobjdump ``args`` (text output captured); FileNotFoundError when there is no cuobjdump."""
    tool = find_cuobjdump()
    if tool is None:
        raise FileNotFoundError(NOT_FOUND)
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=600, check=check)


def _function_lines(text: str, arch_line: str, function_line: str) -> Iterator[Tuple[str, str, Optional[str]]]:
    """(arch, function, line) for each line of a function's part of a cuobjdump listing, and
    (arch, function, None) at its header. ``arch_line``/``function_line``: regexes whose group 1 is
    the arch / the function's name. A lone cubin names no arch: its functions are under "?"."""
    arch, func = "?", None
    for ln in text.splitlines():
        m = re.search(arch_line, ln)
        if m:
            arch, func = m.group(1), None
            continue
        m = re.search(function_line, ln)
        if m:
            func = m.group(1)
            yield arch, func, None
        elif func is not None:
            yield arch, func, ln


def parse_res_usage(text: str) -> Dict[Tuple[str, str], Dict[str, int]]:
    """{(arch, function): {REG, STACK, SHARED, LOCAL, ...}} from ``cuobjdump -res-usage`` (the
    first counter line after each function's header)."""
    out: Dict[Tuple[str, str], Dict[str, int]] = {}
    for arch, func, ln in _function_lines(text, r"^\s*arch\s*=\s*(sm_\d+\w*)", r"^\s*Function\s+(\S+?)\s*:?\s*$"):
        if ln is not None and "REG:" in ln:
            out.setdefault((arch, func), {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", ln)})
    return out


def parse_sass(text: str, pattern: "re.Pattern[str]") -> Dict[Tuple[str, str], bool]:
    """{(arch, function): whether a SASS line of it matches ``pattern``} from ``cuobjdump -sass``."""
    out: Dict[Tuple[str, str], bool] = {}
    for arch, func, ln in _function_lines(text, r"code for (sm_\d+\w*)", r"^\s*Function\s*:\s*(\S+)"):
        out[(arch, func)] = out.get((arch, func), False) or (ln is not None and bool(pattern.search(ln)))
    return out
