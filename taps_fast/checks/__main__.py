"""``python -m taps_fast.checks [triton|ext] [options]``: the static GPU checks.

``triton`` takes ``--dtypes``/``--archs`` (as ``python -m taps_fast.info --kernels``), ``ext`` an
optional extension file. With no check named, both run in that order with their defaults, and
the first failing exit status is returned (``make check-kernels``).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

from . import ext_sass, triton_sass

CHECKS: Dict[str, Callable[[List[str]], int]] = {
    "triton": triton_sass.main,
    "ext": ext_sass.main,
}

USAGE = "usage: python -m taps_fast.checks [{triton,ext}] [options]  (python -m taps_fast.checks <check> --help)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CHECKS:
        return CHECKS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").strip())
        return 0
    if argv:
        print(f"{USAGE}\npython -m taps_fast.checks: unknown check {argv[0]!r}", file=sys.stderr)
        return 2
    for check in CHECKS.values():
        rc = check([])
        sys.stdout.flush()
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
