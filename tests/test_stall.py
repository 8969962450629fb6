"""Stall detection (issue 12, item 12): work that fits on no live node fails the run instead of hanging."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import yaml

from helpers import make_shards, run_config
from labelmill.engine.executor import PipelineStalled, StallWatch, unschedulable
from labelmill.exitcodes import EXIT_ERROR

CPU_NODE = {"Alive": True, "Resources": {"CPU": 8.0, "memory": 1e9}}
DEAD_GPU_NODE = {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}


def test_unschedulable_names_what_no_live_node_has():
    requests = {"read": {"CPU": 0.25}, "label": {"CPU": 1.0, "GPU": 1.0}}
    assert unschedulable(requests, [CPU_NODE, DEAD_GPU_NODE]) == {"label": {"GPU": 1.0}}
    assert unschedulable(requests, [CPU_NODE, dict(DEAD_GPU_NODE, Alive=True)]) == {}


def test_watch_fails_a_fixed_cluster_and_waits_on_an_autoscaling_one(monkeypatch):
    import labelmill.engine.executor as executor

    now = [0.0]
    monkeypatch.setattr(executor.time, "monotonic", lambda: now[0])
    requests = {"label": {"CPU": 1.0, "GPU": 1.0}}
    fixed = StallWatch(60, requests, False, io.StringIO(), nodes=lambda: [CPU_NODE, DEAD_GPU_NODE])
    now[0] = 59
    fixed.check()                      # not yet
    now[0] = 61
    with pytest.raises(PipelineStalled, match=r"no live node has \{GPU: 1\}"):
        fixed.check()

    out = io.StringIO()
    now[0] = 0
    scaling = StallWatch(60, requests, True, out, nodes=lambda: [CPU_NODE])
    now[0] = 61
    scaling.check()                    # says it waits for nodes, does not fail yet
    assert "waiting for nodes" in out.getvalue() and "GPU: 1" in out.getvalue()
    now[0] = 121
    with pytest.raises(PipelineStalled, match="autoscaler added no such node"):
        scaling.check()

    busy = StallWatch(60, {"label": {"CPU": 1.0}}, False, io.StringIO(), nodes=lambda: [CPU_NODE])
    now[0] = 10_000
    busy.check()                       # slow but schedulable: never a stall


def test_label_stage_needing_a_resource_no_node_has_fails_with_its_name(tmp_path):
    make_shards(tmp_path / "in", 1, 2)
    cfg = run_config(str(tmp_path / "in"), str(tmp_path / "out"))
    cfg["ray"].update(num_cpus=2, actor_resources={"teacher_node": 1}, stall_timeout_s=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "labelmill", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == EXIT_ERROR, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("labelmill: pipeline stalled") and "teacher_node: 1" in last, proc.stderr[-3000:]
