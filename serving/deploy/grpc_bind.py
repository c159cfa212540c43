"""Binds Ray Serve's gRPC proxy to the address `adept serve` was given.

Ray Serve 2.60's gRPCOptions has no host: its proxy listens on [::]:port, every interface, even when HTTP
is bound to 127.0.0.1. `adept serve` installs `bind_grpc_proxy` as the Ray job's worker_process_setup_hook
with ADEPT_GRPC_HOST set, so the proxy actor binds to that host instead. It replaces a private Ray function
(`ray.serve._private.default_impl.add_grpc_address`, which Serve looks up when the proxy starts), checked
against Ray 2.60; where that function is missing the hook warns and the proxy keeps Ray's default."""

from __future__ import annotations

import logging
import os

HOST_ENV = "ADEPT_GRPC_HOST"

log = logging.getLogger(__name__)


def bind_grpc_proxy() -> None:
    host = os.environ.get(HOST_ENV)
    if not host:
        return
    try:
        from ray.serve._private import default_impl
    except ImportError:
        return
    if not hasattr(default_impl, "add_grpc_address"):
        log.warning("this Ray version has no add_grpc_address: the gRPC proxy binds every interface, not %s", host)
        return

    def add_grpc_address(server, address: str) -> None:
        server.add_insecure_port(f"{host}:{address.rsplit(':', 1)[1]}")

    default_impl.add_grpc_address = add_grpc_address
