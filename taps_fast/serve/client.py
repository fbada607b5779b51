"""Python clients of ``taps-fast serve``: Client (blocking) and AsyncClient (asyncio), on httpx.

    with Client("http://127.0.0.1:8000") as c:
        c.predict("cars", "photo.jpg", top_k=3)     # {"task", "top_k": [{"index", "prob", "label"?}], ...}
        c.tasks()                                   # GET /v1/tasks
        c.add_task("/srv/tasks/birds.safetensors", pin=True)
        c.remove_task("birds")

An image is a path, bytes, or a PIL image (sent as PNG). A refused request raises ServerError
with the HTTP status, the server's message and, on 503, its Retry-After.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Optional, Union

import httpx

Image = Union[str, "os.PathLike[str]", bytes, Any]


class ServerError(Exception):
    """The server refused a request: ``status`` (HTTP), ``detail`` (its message), ``retry_after``."""

    def __init__(self, status: int, detail: str, retry_after: Optional[float] = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.retry_after = status, detail, retry_after


def _image_bytes(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")


def _predict_args(image: Image, top_k: Optional[int], logits: bool) -> Dict:
    params = {"logits": "true"} if logits else {}
    if top_k is not None:
        params["top_k"] = str(top_k)
    return {"content": _image_bytes(image), "params": params,
            "headers": {"content-type": "application/octet-stream"}}


def _result(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        ra = r.headers.get("retry-after")
        raise ServerError(r.status_code, str(detail), float(ra) if ra else None)
    return r.json()


class Client:
    """A blocking client (one httpx.Client: keep-alive connections, thread-safe)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, **httpx_kwargs) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, **httpx_kwargs)

    def predict(self, task: str, image: Image, top_k: Optional[int] = None, logits: bool = False) -> Dict:
        return _result(self._http.post(f"/v1/tasks/{task}/predict", **_predict_args(image, top_k, logits)))

    def tasks(self) -> Dict:
        return _result(self._http.get("/v1/tasks"))

    def add_task(self, path: str, name: Optional[str] = None, pin: bool = False, load: bool = False) -> Dict:
        body = {"path": os.fspath(path), "pin": pin, "load": load, **({"name": name} if name else {})}
        return _result(self._http.post("/v1/tasks", json=body))

    def remove_task(self, name: str) -> Dict:
        return _result(self._http.delete(f"/v1/tasks/{name}"))

    def health(self) -> Dict:
        return _result(self._http.get("/healthz"))

    def metrics(self) -> str:
        r = self._http.get("/metrics")
        r.raise_for_status()
        return r.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio client (one httpx.AsyncClient)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, **httpx_kwargs) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, **httpx_kwargs)

    async def predict(self, task: str, image: Image, top_k: Optional[int] = None, logits: bool = False) -> Dict:
        return _result(await self._http.post(f"/v1/tasks/{task}/predict", **_predict_args(image, top_k, logits)))

    async def tasks(self) -> Dict:
        return _result(await self._http.get("/v1/tasks"))

    async def add_task(self, path: str, name: Optional[str] = None, pin: bool = False, load: bool = False) -> Dict:
        body = {"path": os.fspath(path), "pin": pin, "load": load, **({"name": name} if name else {})}
        return _result(await self._http.post("/v1/tasks", json=body))

    async def remove_task(self, name: str) -> Dict:
        return _result(await self._http.delete(f"/v1/tasks/{name}"))

    async def health(self) -> Dict:
        return _result(await self._http.get("/healthz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
