"""The refusal of a request, shared by the payload readers (:mod:`cachestore.serving.payloads`,
:mod:`cachestore.serving.arrow_limits`) and the routes."""

from __future__ import annotations


class BadRequest(ValueError):
    """A request the server refuses: ``status`` (400 unreadable, 413 too large, 415 unknown type,
    422 invalid value), ``field`` (the path of the offending value) and a one-line message."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}
