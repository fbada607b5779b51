"""``taps-fast serve`` (and ``python -m taps_fast.serve``): many TAPS tasks on one base model
over HTTP, in mixed-task batches.

    taps-fast serve --model resnet18 --base-weights base.safetensors --tasks tasks/ --port 8000

Every ``NAME.safetensors`` task file in a ``--tasks`` folder is served as task NAME (and the base
model itself as "base"). SIGINT / SIGTERM drain: the server stops accepting connections, answers
every request it accepted, then exits.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .service import DTYPES, ServeConfig


def parser() -> argparse.ArgumentParser:
    d = ServeConfig(model="")
    p = argparse.ArgumentParser(prog="taps-fast serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm model name of the base (required unless --example)")
    g.add_argument("--example", metavar="DIR", help="serve the example (a seeded resnet18 and four synthetic "
                                                    "tasks, written to DIR when missing): nothing to download")
    g.add_argument("--base-weights", help="the base's state dict: .safetensors, or a torch file (read with "
                                          "weights_only=True)")
    g.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (needs its hub or cache)")
    g.add_argument("--num-classes", type=int, help="classes of the base head (default: the model's)")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's data config; "
                                                "--example: 96)")
    g.add_argument("--seed", type=int, default=d.seed, help="initialises a base without weights")
    g.add_argument("--device", default=d.device)
    g.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", action="append", default=[], metavar="DIR",
                   help="folder of NAME.safetensors task files (repeatable)")
    g.add_argument("--allow-load-from", action="append", default=[], metavar="DIR",
                   help="another folder POST /v1/tasks may load task files from (repeatable)")
    g.add_argument("--pin", action="append", default=[], metavar="NAME", help="keep this task resident (repeatable)")
    g.add_argument("--preload", action="store_true", help="make the folders' tasks resident at start")
    g.add_argument("--task-budget-mb", type=float, help="bytes of task weights resident on the device (default: "
                                                        "no limit); LRU eviction past it")
    g.add_argument("--host-cache-mb", type=float, default=d.host_cache_mb,
                   help="checked tasks kept in host memory for fast reloads")
    g.add_argument("--pool-chunk", type=int, default=d.pool_chunk, help="rows the model's task tables grow by")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=d.max_batch)
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long the oldest request waits for its batch to fill")
    g.add_argument("--max-tasks-per-batch", type=int, default=d.max_tasks_per_batch)
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="requests queued; past it 503 + Retry-After")
    g.add_argument("--pad-buckets", action=argparse.BooleanOptionalAction, default=None,
                   help="pad batches to power-of-two sizes (default: on for CUDA)")
    g.add_argument("--cpu-chunk", type=int, default=d.cpu_chunk, help="MultiTaskModel's task-pure chunk on the CPU")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-body-mb", type=float, default=d.max_body_mb)
    g.add_argument("--preprocess-workers", type=int, default=d.preprocess_workers)
    g.add_argument("--default-top-k", type=int, default=d.default_top_k)
    g.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="at shutdown, how long accepted requests may take to be answered")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="uvicorn's line per request (GET /metrics counts them either way)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    fields = ServeConfig.__dataclass_fields__
    return ServeConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.example:
        from .example import EXAMPLE_SIZE, write_example

        ex = write_example(args.example, **({"model": args.model} if args.model else {}))
        args.model, args.base_weights = ex["model"], ex["base"]
        args.tasks = args.tasks + [ex["tasks_dir"]]
        args.img_size = args.img_size or EXAMPLE_SIZE
    elif not args.model:
        p.error("--model is required (or --example DIR)")
    import uvicorn

    from .app import create_app
    from .service import Service

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    try:
        service = Service(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"taps-fast serve: {e}", file=sys.stderr)
        return 2
    app = create_app(service, drain_timeout_s=args.drain_timeout_s)
    print(f"taps-fast serve: {cfg.model} on http://{args.host}:{args.port} (tasks: GET /v1/tasks; predict: "
          f"curl --data-binary @photo.jpg http://{args.host}:{args.port}/v1/tasks/NAME/predict)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log,
                timeout_graceful_shutdown=int(args.drain_timeout_s) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
