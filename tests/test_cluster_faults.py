"""Faults at cluster scale on one machine: a Ray cluster of a head and worker nodes
(`ray.cluster_utils.Cluster`, six nodes, each its own raylet), the pipeline spread across them, and the node
holding a layer group removed mid-stream (every process of it killed). Runs benchmarks/node_loss.py in a
process of its own (its cluster cannot share this process with the suite's Ray) and checks its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("default_model_dir")
def test_a_node_lost_mid_stream_loses_no_stream(tmp_path):
    out = tmp_path / "node_loss.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "node_loss.py"), "--streams", "3", "--max-tokens", "96",
               "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--json", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    said = json.dumps(report)
    assert report["nodes"] == 6 and report["removed"]["layers"]
    assert report["in_flight_at_loss"] == 3, said  # the loss came mid-stream
    assert report["completed_identical"] == 3 and report["failed"] == [], said  # text as without the fault
    codes = [code for _, code in report["health_during"]]
    assert codes[-1] == 200, said  # healthy again once the worker was rescheduled
    blocks = report["kv_blocks"]
    assert blocks["free"] == blocks["capacity"] and all(w == [] for w in blocks["workers"]), blocks
