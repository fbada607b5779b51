"""``python -m taps_fast.bench`` (and ``taps-fast bench``): run one benchmark suite.

``--suite`` names the suite (default ``models``); every other option belongs to that suite, so
``python -m taps_fast.bench --suite kernels --help`` lists the kernels suite's options. A suite is
its module's ``main(argv)``, which parses the whole command line itself (``--suite`` included).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence

from . import kernels, models, multitask, overhead, small


def _models(argv: List[str]) -> int:
    return models.main(argv, suites=tuple(REGISTRY))


def _serve(argv: List[str]) -> int:  # imported on use: the serve extras (FastAPI, uvicorn) are optional
    from . import serve

    return serve.main(argv)


# name -> runner(argv) -> exit status. The order is the one --suite's help lists.
REGISTRY: Dict[str, Callable[[List[str]], int]] = {
    "models": _models,
    "kernels": kernels.main,
    "multitask": multitask.main,
    "small": small.main,
    "overhead": overhead.main,
    "serve": _serve,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only --suite is read here (help and every other option are left to the suite's parser).
    router = argparse.ArgumentParser(prog="python -m taps_fast.bench", add_help=False)
    router.add_argument("--suite", choices=list(REGISTRY), default="models")
    suite = router.parse_known_args(argv)[0].suite
    return REGISTRY[suite](argv)


if __name__ == "__main__":
    sys.exit(main())
