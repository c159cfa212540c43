"""The engine's exception types, at the bottom of the import order: anything may raise or catch them
without importing the engine. The API edge maps them to HTTP and gRPC statuses (serving/api/errors.py)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the client can fix: the message names the offending parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message

    def __reduce__(self) -> tuple:  # it crosses processes (Ray) inside a Rejected event
        return RequestError, (self.param, self.message)


class QueueFullError(RuntimeError):
    """The admission queue is full: retry later."""


class EngineError(RuntimeError):
    """A request failed inside the engine (not the client's fault); other requests are unaffected."""


class EngineUnavailable(EngineError):
    """The pipeline lost a worker for good: retry the request (another pipeline, or this one replaced)."""


def first_line(error: BaseException) -> str:
    """An error's first line for a log or a client (Ray's errors run to many lines; some have none)."""
    return (str(error).splitlines() or [type(error).__name__])[0]
