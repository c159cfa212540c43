"""Running an application on a Ray cluster from Python: what `adept serve`, the tests and the benchmarks do
(`start(config, build_app(config))`, the builder from serving/app.py)."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import TracingConfig

from serving.config import APP_NAME, GRPC_SERVICERS, AppConfig
from serving.deploy.grpc_bind import HOST_ENV
from serving.engine.exceptions import first_line
from serving.telemetry import tracing

log = logging.getLogger(__name__)


def init_ray(config: AppConfig, address: str | None = None, **kwargs) -> None:
    """Connect to the Ray cluster at `address` (or start one on this machine). Every worker of the job
    runs offline (nothing is downloaded) and Serve's gRPC proxy binds to `config.grpc.host`."""
    runtime_env = {
        "env_vars": {"HF_HUB_OFFLINE": "1", HOST_ENV: config.grpc.host},
        "worker_process_setup_hook": "serving.deploy.grpc_bind.bind_grpc_proxy",
    }
    ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, **kwargs)


def start(config: AppConfig, app: Application, proxy_location: str = "EveryNode") -> DeploymentHandle:
    """Start Serve with the configured listeners and run `app`; returns the ingress handle. Serve runs a
    proxy on every node; `proxy_location="HeadOnly"` where the nodes share one machine (and its ports)."""
    serve.start(
        proxy_location=proxy_location,
        http_options={"host": config.http.host, "port": config.http.port},
        grpc_options={"port": config.grpc.port, "grpc_servicer_functions": GRPC_SERVICERS},
        tracing_config=TracingConfig(
            enabled=tracing.exporting(),
            exporter_import_path=tracing.EXPORTER,
            sampling_ratio=config.trace_sampling_ratio,
        ),
    )
    return serve.run(app, name=APP_NAME, route_prefix="/")


def stop(grace_s: float | None = None) -> None:
    """Stop Serve and Ray. With `grace_s`, first every pipeline refuses new requests and gives the admitted
    ones that long to finish; the rest end with finish_reason "abort" (their streams end cleanly, rather
    than cut when Serve kills a replica that is still busy)."""
    if grace_s is not None:
        try:
            handle = serve.get_deployment_handle("PipelineReplica", APP_NAME)
            cut = handle.broadcast("close", grace_s).results(timeout_s=grace_s + 15)
            if sum(cut):
                log.warning("%d requests ended with finish_reason 'abort' after %.0f s", sum(cut), grace_s)
        except Exception as e:  # the application never started, or is gone: nothing to wait for
            log.warning("stopping without waiting for requests: %s", first_line(e))
    serve.shutdown()
    ray.shutdown()
