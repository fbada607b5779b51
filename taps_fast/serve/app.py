"""The HTTP front end: a FastAPI app over one Service (uvicorn runs it; Ray Serve can too).

    POST   /v1/tasks/{task}/predict   an image: multipart field "image" (or "file"), a raw image/*
                                      or application/octet-stream body, or JSON {"image": base64,
                                      "top_k": 5, "logits": false}; query ?top_k=&logits= too.
                                      "base" is the base model itself.
    GET    /v1/tasks                  every task: resident or not, bytes, pinned, labels
    POST   /v1/tasks                  {"path": FILE, "name": NAME?, "pin": false, "load": false} -> 201
    DELETE /v1/tasks/{task}
    GET    /metrics                   Prometheus exposition
    GET    /healthz                   200 while serving, 503 while draining

Errors answer ``{"detail": "..."}`` with the status of their ServeError (errors.py): 400 a body
that is not a decodable image, 403 a task file outside the task folders, 404 an unknown task,
409 a taken name or another base's task file, 413 a body over ``max_body_bytes``, 415 an
unsupported content type, 422 JSON of the wrong form or a corrupt task file, 503 (Retry-After)
a full queue or a draining server, 507 a task larger than the whole budget.

Pre-processing (PIL decoding, timm's eval transform) runs in a thread pool, never on the event
loop; the event loop only awaits the engine's Future, so one process holds thousands of requests
in flight while the model thread forms batches from them.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..multitask import BASE
from .errors import BadRequest, PayloadTooLarge, ServeError, Unprocessable, UnsupportedMediaType
from .service import TASK_SUFFIX, Service

log = logging.getLogger("taps_fast.serve")

MAX_TOP_K = 1000
UNKNOWN_TASK_LABEL = "<unknown>"  # the metrics' task label for names the server does not have


class PredictJSON(BaseModel):
    """The JSON form of a predict request."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, description="the encoded image (JPEG, PNG, ...), base64")
    top_k: Optional[int] = Field(None, ge=1, le=MAX_TOP_K)
    logits: bool = False


class AddTaskJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="a task file inside one of the server's task folders")
    name: Optional[str] = Field(None, min_length=1, description="default: the file name without .safetensors")
    pin: bool = False
    load: bool = False


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def _parse_json(model, body: bytes):
    if not body:
        raise Unprocessable("the JSON body is empty")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise Unprocessable(f"the JSON body is not a valid {model.__name__}: {_validation_message(e)}") from None


class BodyLimit:
    """Pure ASGI middleware: a request body over ``max_bytes`` is answered 413, from its
    Content-Length when it has one and by counting what arrives when it streams."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n > limit:
                    response = JSONResponse({"detail": f"the request body is {n} bytes; this server takes at most "
                                                       f"{limit} bytes (--max-body-mb)"}, status_code=413)
                    return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the request body is over {limit} bytes, this server's limit "
                                          "(--max-body-mb)")
            return message

        await self.app(scope, limited_receive, send)


def create_app(service: Service, *, manage: bool = True, drain_timeout_s: float = 30.0) -> FastAPI:
    """The FastAPI app of ``service``. ``manage``: the app's lifespan starts the service (reads
    the task folders) and, at shutdown, drains it: every accepted request is answered first."""
    executor = ThreadPoolExecutor(service.cfg.preprocess_workers, thread_name_prefix="taps-serve-preprocess")
    max_body = int(service.cfg.max_body_mb * (1 << 20))
    engine, metrics, pool = service.engine, service.metrics, service.pool

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage:
            await asyncio.to_thread(service.start)
            log.info("serving %s with %d tasks (%d refused)", service.cfg.model,
                     len(pool.names()), len(service.refused))
        try:
            yield
        finally:
            if manage:
                await asyncio.to_thread(service.close, True, drain_timeout_s)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="taps_fast serve", lifespan=lifespan,
                  description="Many TAPS tasks on one base model, served in mixed-task batches.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=e.headers)

    @app.post("/v1/tasks/{task}/predict")
    async def predict(task: str, request: Request,
                      top_k: Optional[int] = Query(None, ge=1, le=MAX_TOP_K),
                      logits: bool = Query(False)):
        t0 = time.perf_counter()
        label, status = UNKNOWN_TASK_LABEL, 500
        try:
            if task != BASE:
                pool.get(task)  # 404 before the body is read or decoded
            label = task
            k, with_logits = top_k, logits
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "multipart/form-data":
                try:
                    form = await request.form(max_files=1, max_fields=4, max_part_size=max_body)
                except ServeError:
                    raise
                except Exception as e:  # starlette's MultiPartException and parser errors
                    raise BadRequest(f"the multipart body could not be parsed: {e}") from None
                part = form.get("image", form.get("file"))
                if part is None or isinstance(part, str):
                    raise BadRequest("the multipart body has no file field named 'image' (or 'file')")
                data = await part.read()
            elif ctype == "application/json":
                body = _parse_json(PredictJSON, await request.body())
                try:
                    data = base64.b64decode(body.image, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise Unprocessable(f"the JSON field 'image' is not valid base64: {e}") from None
                k = body.top_k if body.top_k is not None else k
                with_logits = body.logits or with_logits
            elif ctype in ("", "application/octet-stream") or ctype.startswith("image/"):
                data = await request.body()
            else:
                raise UnsupportedMediaType(f"content type {ctype!r} is not taken: send an image (image/*, "
                                           "application/octet-stream), a multipart form or JSON")
            x = await asyncio.get_running_loop().run_in_executor(executor, service.preprocess, data)
            k = service.cfg.default_top_k if k is None else k
            result = await asyncio.wrap_future(engine.submit(task, x, k, with_logits))
            status = 200
            return result
        except ServeError as e:
            status = e.status
            raise
        finally:
            metrics.request(label, status, time.perf_counter() - t0)

    @app.get("/v1/tasks")
    async def list_tasks():
        return engine.tasks_info()

    @app.post("/v1/tasks", status_code=201)
    async def add_task(request: Request):
        body = _parse_json(AddTaskJSON, await request.body())
        path = service.resolve_task_path(body.path)
        name = body.name
        if name is None:
            name = os.path.basename(path)
            if name.endswith(TASK_SUFFIX):
                name = name[: -len(TASK_SUFFIX)]
        return await asyncio.wrap_future(engine.add_task(name, path, pin=body.pin, load=body.load))

    @app.delete("/v1/tasks/{task}")
    async def remove_task(task: str):
        return await asyncio.wrap_future(engine.remove_task(task))

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz():
        info = {"status": "ok" if engine.accepting else "draining", "model": service.cfg.model,
                "tasks": len(pool.names()), "resident": sum(e.resident for e in pool.entries()),
                "queue_depth": engine.queue_depth, "batches": engine.batches_run}
        return JSONResponse(info, status_code=200 if engine.accepting else 503)

    return app
