"""taps_fast.serve: many TAPS tasks on one base model, served over HTTP in mixed-task batches.

One process holds the base model as a MultiTaskModel and any number of task files (save_task).
Requests for different tasks queue together; one model thread forms batches of rows that each
belong to their own task (up to --max-batch rows, --max-tasks-per-batch tasks, --max-wait-ms) and
runs each batch as one forward. Tasks are resident on the device under a byte budget (LRU,
pinning; a batch in flight never loses its task) and reloaded from a host cache or their file.

    taps-fast serve --model resnet18 --base-weights base.safetensors --tasks tasks/
    python -m taps_fast.serve ...                   # the same

    from taps_fast.serve import Client
    Client("http://127.0.0.1:8000").predict("cars", "photo.jpg")["top_k"]

Parts: service.py (ServeConfig, Service: builds everything), engine.py (the batcher and model
thread), pool.py (registry, budget, host cache), processing.py (timm's eval transform, top-k),
app.py (FastAPI front end), metrics.py (Prometheus), client.py (sync and async clients),
ray_app.py (the same app as a Ray Serve deployment). docs/serving.md has the depth.
"""
from __future__ import annotations

from .client import AsyncClient, Client, ServerError
from .errors import ServeError
from .service import ServeConfig, Service

__all__ = ["AsyncClient", "Client", "ServeConfig", "ServeError", "ServerError", "Service", "create_app"]


def create_app(service: Service, **kwargs):
    """The FastAPI app of ``service`` (app.create_app; imported on use: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(service, **kwargs)
