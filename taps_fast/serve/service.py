"""Building a server: the base model, its MultiTaskModel, the task pool, the engine and the
pre-processing, from one ServeConfig (what ``taps-fast serve``'s options and the Ray Serve
deployment both fill in)."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

from ..multitask import MultiTaskModel
from ..pretrained import load_pretrained
from .engine import Engine, default_buckets
from .errors import Forbidden, ServeError, Unprocessable
from .metrics import Metrics
from .pool import MB, TaskPool
from .processing import Preprocessor

log = logging.getLogger("taps_fast.serve")

TASK_SUFFIX = ".safetensors"


@dataclass
class ServeConfig:
    """Everything a server is built from (the CLI options of ``taps-fast serve``)."""

    model: str  # a timm model name
    base_weights: Optional[str] = None  # the base's state dict: safetensors, or a torch file (weights_only)
    pretrained: bool = False  # timm's own pretrained weights (needs its hub or cache)
    num_classes: Optional[int] = None  # the base head's classes (default: the model's)
    img_size: Optional[int] = None  # input resolution (timm's data config otherwise)
    seed: int = 0  # initialises a base without weights (its tasks' fingerprint then depends on it)
    tasks: List[str] = field(default_factory=list)  # folders of task files (NAME.safetensors)
    allow_load_from: List[str] = field(default_factory=list)  # more folders POST /v1/tasks may read
    pin: List[str] = field(default_factory=list)
    preload: bool = False  # make the task folders' tasks resident at start (as far as the budget allows)
    device: str = "cpu"
    dtype: str = "float32"
    task_budget_mb: Optional[float] = None  # None: every task may be resident
    host_cache_mb: float = 1024.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_tasks_per_batch: int = 16
    max_queue: int = 1024
    pad_buckets: Optional[bool] = None  # None: on for CUDA, off for the CPU (see engine.py)
    max_body_mb: float = 8.0
    preprocess_workers: int = 2
    loaders: int = 1
    cpu_chunk: int = 8
    pool_chunk: int = 8
    default_top_k: int = 5

    def as_dict(self) -> dict:
        return asdict(self)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_base(cfg: ServeConfig) -> nn.Module:
    """The timm base model of ``cfg`` (weights from cfg.base_weights, timm, or seeded init)."""
    import timm

    kw = {}
    if cfg.num_classes is not None:
        kw["num_classes"] = cfg.num_classes
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained,
                                  **kw, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    except TypeError:  # a model without an img_size argument (CNNs): the data config sets the size
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kw)
    if cfg.base_weights:  # a file or a packaged name; every key must fit, the head included
        load_pretrained(model, cfg.base_weights, head=[])
    elif not cfg.pretrained:
        log.warning("%s has no base weights (--base-weights / --pretrained): randomly "
                    "initialised with seed %d", cfg.model, cfg.seed)
    return model.eval()


def data_config(cfg: ServeConfig, base: nn.Module) -> dict:
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=base)
    if cfg.img_size:
        dc["input_size"] = (dc["input_size"][0], cfg.img_size, cfg.img_size)
    return dc


class Service:
    """One server's parts: ``model`` (MultiTaskModel), ``pool``, ``engine``, ``preprocess``,
    ``metrics``; ``start()`` registers the task folders' files and starts the model thread."""

    def __init__(self, cfg: ServeConfig, base: Optional[nn.Module] = None, model=None) -> None:
        """``base``: the base model (default: built from cfg); ``model``: what serves the tasks
        (default: a MultiTaskModel of the base; anything with its task API, see engine.py)."""
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        self.cfg = cfg
        base = build_base(cfg) if base is None else base.eval()
        self.preprocess = Preprocessor(data_config=data_config(cfg, base))
        device = torch.device(cfg.device)
        base = base.to(device, DTYPES[cfg.dtype])
        if model is None:
            model = MultiTaskModel(base, cpu_chunk=cfg.cpu_chunk, pool_chunk=cfg.pool_chunk)
        self.model = model.eval()
        budget = None if cfg.task_budget_mb is None else int(cfg.task_budget_mb * MB)
        self.pool = TaskPool(budget, int(cfg.host_cache_mb * MB))
        self.metrics = Metrics()
        pad = cfg.pad_buckets if cfg.pad_buckets is not None else device.type == "cuda"
        self.engine = Engine(self.model, self.pool, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                             max_tasks_per_batch=cfg.max_tasks_per_batch, max_queue=cfg.max_queue,
                             buckets=default_buckets(cfg.max_batch) if pad else None, loaders=cfg.loaders,
                             metrics=self.metrics)
        self.load_dirs = [os.path.realpath(d) for d in list(cfg.tasks) + list(cfg.allow_load_from)]
        self.refused: dict = {}  # task file -> why it was not registered at start

    def start(self) -> "Service":
        self.engine.start()
        futures = []
        for folder in self.cfg.tasks:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"task folder {folder!r} does not exist")
            for fn in sorted(os.listdir(folder)):
                if fn.endswith(TASK_SUFFIX):
                    name, path = fn[: -len(TASK_SUFFIX)], os.path.join(folder, fn)
                    futures.append((path, self.engine.add_task(name, path, pin=name in self.cfg.pin,
                                                               load=self.cfg.preload)))
        for path, fut in futures:  # every file read and checked before the server answers
            try:
                fut.result()
            except ServeError as e:
                self.refused[path] = e.message
                log.error("task file %s refused: %s", path, e.message)
        missing = [p for p in self.cfg.pin if not self.pool.has(p)]
        if missing:
            raise ValueError(f"--pin names tasks no task folder holds (or that were refused): {missing}")
        return self

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.engine.close(drain=drain, timeout=timeout)

    def resolve_task_path(self, path: str) -> str:
        """A task file path a client gave (POST /v1/tasks): it must lie in a task folder."""
        if not isinstance(path, str) or not path:
            raise Unprocessable("'path' must be a non-empty string")
        real = os.path.realpath(path if os.path.isabs(path) or not self.load_dirs
                                else os.path.join(self.load_dirs[0], path))
        if not any(real == d or real.startswith(d + os.sep) for d in self.load_dirs):
            raise Forbidden(f"{path!r} is outside the folders this server loads task files from "
                            f"({self.load_dirs}; add one with --allow-load-from)")
        return real
