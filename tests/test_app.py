"""The application's configuration: one pydantic model behind `adept serve --config`, Ray Serve's
`serve run`/`serve deploy` config files (import_path + args) and, later, KubeRay's serveConfigV2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray._common.utils import import_attr
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from serving.app import build_app
from serving.config import GRPC_SERVICERS, AppConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_serve_config_file_builds_the_application_the_way_serve_does():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text()))
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    for servicer in GRPC_SERVICERS:
        import_attr(servicer)  # the servicer functions Serve's gRPC proxy imports
    (app_schema,) = schema.applications
    builder = import_attr(app_schema.import_path)
    assert builder is build_app
    app = call_user_app_builder_with_args_if_necessary(builder, app_schema.args)
    assert isinstance(app, Application)
    assert AppConfig.model_validate(app_schema.args).engine.num_layer_groups == 3


def test_adept_serve_config_file_is_the_same_model():
    config = AppConfig.from_yaml(EXAMPLES / "adept.yaml")
    assert (config.engine.num_layer_groups, config.engine.max_inflight_batches) == (3, 1)
    assert (config.http.host, config.http.port, config.grpc.port) == ("127.0.0.1", 8000, 9000)


def test_unknown_or_bad_fields_are_refused_by_name():
    with pytest.raises(ValidationError, match="num_pipeline"):
        AppConfig.model_validate({"num_pipeline": 2})
    with pytest.raises(ValidationError, match=r"engine\.max_num_seqs"):
        AppConfig.model_validate({"engine": {"max_num_seqs": 0}})
    with pytest.raises(ValidationError, match=r"http\.port"):
        AppConfig.model_validate({"http": {"host": "127.0.0.1", "port": 70000}})


def test_one_gpu_per_layer_group_worker_unless_told_otherwise():
    assert AppConfig(accelerator="gpu").worker_bundle(gpus=True) == {"CPU": 1.0, "GPU": 1.0}
    assert AppConfig().worker_bundle(gpus=False) == {"CPU": 0.25}
    assert AppConfig(worker_resources={"CPU": 2, "TPU": 1}).worker_bundle(gpus=True) == {"CPU": 2, "TPU": 1}
    assert AppConfig(accelerator="gpu").uses_gpus() and not AppConfig(accelerator="cpu").uses_gpus()
