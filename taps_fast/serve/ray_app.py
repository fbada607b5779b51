"""The same server as a Ray Serve deployment: each replica holds its own MultiTaskModel, task
pool and batcher (one Service) behind the same FastAPI app; Ray Serve's proxy spreads requests
over the replicas, and each replica forms mixed-task batches from what it receives.

    import ray
    from ray import serve
    from taps_fast.serve import ServeConfig
    from taps_fast.serve.ray_app import build_deployment

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_deployment(ServeConfig(model="resnet18", base_weights="/srv/base.safetensors",
                                           tasks=["/srv/tasks"]), num_replicas=2))

Every replica reads the same task folders, so the files must be on a path every node sees (a
shared file system, or the same files on each node). Task added or removed at run time through
POST / DELETE /v1/tasks reach only the replica that answered: for a change every replica sees,
put the file in the task folder and redeploy (``serve.run`` again), which Ray Serve rolls over
replica by replica.

``max_ongoing_requests`` is Ray Serve's limit of requests a replica holds at once (its default of
5 would starve the batcher): it defaults to the server's queue size, ``cfg.max_queue``.
"""
from __future__ import annotations

from typing import Optional

from .service import ServeConfig


def build_deployment(cfg: ServeConfig, *, num_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                     max_ongoing_requests: Optional[int] = None, name: str = "taps_fast_serve"):
    """A bound Ray Serve application of ``cfg`` (``serve.run`` it)."""
    from ray import serve

    cfg_dict = cfg.as_dict()  # plain data: what is shipped to the replicas

    def build_app():  # evaluated on each replica
        from .app import create_app
        from .service import ServeConfig, Service

        return create_app(Service(ServeConfig(**cfg_dict)))

    ingress = serve.ingress(build_app)
    deployment = serve.deployment(
        ingress(type("TapsServe", (), {"__doc__": "taps_fast.serve behind Ray Serve's proxy"})),
        name=name, num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or cfg.max_queue,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind()
