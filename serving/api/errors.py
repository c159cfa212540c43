"""Errors a client can cause (or must be told about), with what each means in HTTP and in gRPC."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from serving.engine.exceptions import EngineError, EngineUnavailable, QueueFullError, RequestError

# kind -> (HTTP status, OpenAI error type, gRPC status)
KINDS: dict[str, tuple[int, str, grpc.StatusCode]] = {
    "invalid": (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    "unauthenticated": (401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    "not_found": (404, "not_found_error", grpc.StatusCode.NOT_FOUND),
    "too_large": (413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    "overloaded": (429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    "internal": (500, "server_error", grpc.StatusCode.INTERNAL),
    "unavailable": (503, "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
}
# Seconds a refused client should wait before retrying (HTTP Retry-After), by kind.
RETRY_AFTER = {"overloaded": 1, "unavailable": 5}


@dataclass
class ApiError(Exception):
    kind: str
    message: str
    param: str | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return KINDS[self.kind][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return KINDS[self.kind][2]

    def headers(self) -> dict[str, str]:
        if self.kind == "unauthenticated":
            return {"WWW-Authenticate": "Bearer"}
        return {"Retry-After": str(RETRY_AFTER[self.kind])} if self.kind in RETRY_AFTER else {}

    def body(self) -> dict:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": KINDS[self.kind][1], "param": self.param, "code": None}}

    @classmethod
    def of(cls, error: Exception) -> ApiError:
        """What the client is told about an exception raised while admitting or running its request."""
        if isinstance(error, ApiError):
            return error
        if isinstance(error, RequestError):
            return cls("invalid", str(error), error.param)
        if isinstance(error, QueueFullError):
            return cls("overloaded", str(error))
        if isinstance(error, EngineUnavailable):
            return cls("unavailable", str(error))
        if isinstance(error, EngineError):
            return cls("internal", str(error))
        return cls("internal", f"the request failed inside the server: {error}")
