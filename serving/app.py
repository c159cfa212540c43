"""The Ray Serve application: the builder function Serve's `import_path` names, `serving.app:build_app`,
with `args:` the fields of `AppConfig`."""

from __future__ import annotations

from ray.serve import Application

from serving.api.ingress import Ingress
from serving.config import AppConfig
from serving.deploy.replica import PipelineReplica


def build_app(args: AppConfig | dict) -> Application:
    """Serve's builder: `import_path: serving.app:build_app` with `args:` the fields of AppConfig."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    worker = config.worker_bundle(config.uses_gpus())
    # One placement group per pipeline: the replica in bundle 0, layer group i in bundle i + 1.
    bundles = [{"CPU": config.router_cpus}] + [worker] * config.engine.num_layer_groups
    streams = config.engine.max_num_seqs + config.engine.max_waiting_requests
    replica = PipelineReplica.options(
        num_replicas=config.num_pipelines,
        placement_group_bundles=bundles,
        placement_group_strategy=config.placement_strategy,
        ray_actor_options={"num_cpus": config.router_cpus},
        max_ongoing_requests=streams + 16,  # the engine's own admission queue refuses beyond its limit
    ).bind(config, worker)
    return Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=streams * config.num_pipelines + 64,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(replica, config)
