"""The ``taps-fast`` command: ``taps-fast bench|info|serve|train|eval|demo [...]``.

Each subcommand forwards the rest of the command line to its module's ``main`` (imported only
when used), so ``taps-fast bench --help`` shows the benchmark's own options.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "bench": ("taps_fast.bench", "benchmark TAPS-converted timm models against the plain model"),
    "info": ("taps_fast.info", "print versions, the compiled extension and which backends serve here"),
    "serve": ("taps_fast.serve.__main__", "serve many tasks over HTTP in mixed-task batches (FastAPI + uvicorn)"),
    "train": ("taps_fast.train.cli", "adapt a pretrained timm model to ImageFolder data (TAPS, joint, DDP, resume)"),
    "eval": ("taps_fast.train.evaluate", "top-1/top-5 accuracy and parameter fraction of a task file on ImageFolder data"),
    "demo": ("taps_fast.demo", "end-to-end TAPS demo on handwritten digits: FT vs head-only vs TAPS, serving"),
}


def usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: taps-fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<{w}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "taps-fast <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"taps_fast {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"taps-fast: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[cmd][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"taps-fast: the {cmd!r} command is not available in this install ({module_name} is missing)",
              file=sys.stderr)
        return 2
    rc = module.main(rest)
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
