"""The servicer functions Serve's gRPC proxy registers (`grpc_servicer_functions`): the generated ones for
adept.v1.AdeptService and grpc.health.v1.Health, with one change. The proxy decodes each request itself,
and bytes that are not the method's message made it answer UNKNOWN ("Unexpected DecodeError") before any
project code ran; here they decode to a MalformedRequest, which the ingress refuses as INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from protos.adept.v1 import adept_pb2_grpc


@dataclass
class MalformedRequest:
    """What arrived instead of a request message."""

    error: str


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def parse_or_flag(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return MalformedRequest(f"the request message cannot be decoded: {e}")

    return parse_or_flag


def _fix(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


class _TolerantServer:
    """The server as a generated add_*_to_server sees it: handlers get the tolerant decoder on the way in."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for generic in generic_handlers:
            generic._method_handlers = {k: _fix(h) for k, h in generic._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service_name, {k: _fix(h) for k, h in handlers.items()})


def add_AdeptServiceServicer_to_server(servicer: Any, server: grpc.Server) -> None:
    adept_pb2_grpc.add_AdeptServiceServicer_to_server(servicer, _TolerantServer(server))


def add_HealthServicer_to_server(servicer: Any, server: grpc.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, _TolerantServer(server))
