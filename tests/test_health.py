"""Health with several pipelines: /health and gRPC health answer serving while at least one pipeline
serves, whichever pipeline replica a request would be routed to."""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from serving.app import build_app
from serving.config import AppConfig
from serving.engine.config import EngineConfig


def test_health_serves_while_one_of_two_pipelines_is_lost(served, tiny_chat_dir):
    """Two pipelines (of a tiny model: two of the default model do not fit a 2-core machine). A worker of
    one is killed with no restarts left: until Serve replaces that pipeline, /health and gRPC health keep
    answering serving, from the other one, whichever replica a request would be routed to."""
    name = "twin"
    engine = EngineConfig(model=str(tiny_chat_dir), num_layer_groups=2, max_model_len=128)
    # small CPU shares: the session's Ray has 2 CPUs and the default model's application holds about one
    config = AppConfig(engine=engine, num_pipelines=2, worker_max_restarts=0, worker_resources={"CPU": 0.1})
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    url = f"{served.http}/{name}"
    try:
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        workers = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"adept-{name}-")]
        assert len(workers) == 4  # two pipelines of two layer-group workers, named after their app and replica
        victim = ray.get_actor(workers[0]["name"], namespace=workers[0]["namespace"])
        os.kill(ray.get(victim.info.remote())["pid"], signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(victim.ping.remote(), timeout=30)  # its pipeline has lost a worker for good
        channel = grpc.insecure_channel(served.grpc)
        probe = health_pb2_grpc.HealthStub(channel)
        for _ in range(10):  # Serve's health check (every 10 s) has not replaced the lost pipeline yet
            r = httpx.get(f"{url}/health", timeout=60)
            assert r.status_code == 200, r.text
            reply = probe.Check(health_pb2.HealthCheckRequest(), metadata=(("application", name),), timeout=60)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.2)
        channel.close()
    finally:
        serve.delete(name)
