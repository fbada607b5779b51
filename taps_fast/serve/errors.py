"""The server's errors: each names the problem and carries the HTTP status it answers with."""
from __future__ import annotations

from typing import Dict, Optional


class ServeError(Exception):
    """A request the server refuses; ``status`` is its HTTP status code, ``headers`` extra
    response headers (Retry-After on 503)."""

    status = 500

    def __init__(self, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServeError):
    """The request's body is not what the endpoint takes (not an image, malformed fields)."""

    status = 400


class Forbidden(ServeError):
    """A task file outside the folders the server was told it may load from."""

    status = 403


class UnknownTask(ServeError, KeyError):
    """A task name the server does not have (or no longer has)."""

    status = 404

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return self.message


class Conflict(ServeError):
    """The task cannot be added as asked: its name is taken, or its file is for another base."""

    status = 409


class PayloadTooLarge(ServeError):
    """A request body over the server's limit (--max-body-mb)."""

    status = 413


class UnsupportedMediaType(ServeError):
    """A predict body that is neither an image, multipart form nor JSON."""

    status = 415


class Unprocessable(ServeError):
    """Well-formed but invalid: a corrupt task file, JSON of the wrong form."""

    status = 422


class InsufficientBudget(ServeError):
    """A task larger than the whole task budget: it can never be resident on this server."""

    status = 507


class Overloaded(ServeError):
    """The request queue is full, or the task budget is held by pinned tasks: retry later."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class ShuttingDown(Overloaded):
    """The server is draining: it accepts no new request."""
