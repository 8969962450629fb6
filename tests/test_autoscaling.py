"""An autoscaling GPU pool: a CPU head, GPU node types with min_workers 0, and a run that scales onto them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from helpers import gt_sample, gt_teacher, run_config
from labelmill.config import RayConfig
from labelmill.engine.runtime import plan_resources
from labelmill.io.shards import write_shard

HERE = Path(__file__).resolve().parent


def test_plan_asks_for_gpus_on_a_cluster_that_can_start_them():
    # reached by address, no GPU node up yet: the actors still ask for GPUs, so the autoscaler starts some
    plan = plan_resources(RayConfig(max_actors=4), total_cpus=8, total_gpus=0, autoscaling=True, max_gpus=16)
    assert plan.gpus_per_actor == 1 and (plan.min_actors, plan.max_actors) == (1, 4)
    assert plan.read_tasks == 8 and "autoscaler" in plan.note
    # the autoscaler's node types decide the ceiling when max_actors is not given
    assert plan_resources(RayConfig(), 8, 0, autoscaling=True, max_gpus=6).max_actors == 6
    # unknown ceiling: still GPUs (never silently the CPU head)
    assert plan_resources(RayConfig(), 8, 0, autoscaling=True, max_gpus=None).gpus_per_actor == 1
    # a cluster whose node types have no GPU at all labels on CPUs
    assert plan_resources(RayConfig(), 8, 0, autoscaling=True, max_gpus=0).gpus_per_actor == 0
    # device: cpu is honoured; a fixed local pool stays fixed
    assert plan_resources(RayConfig(device="cpu"), 8, 0, autoscaling=True, max_gpus=8).gpus_per_actor == 0
    local = plan_resources(RayConfig(min_actors=1, max_actors=2), total_cpus=16, total_gpus=2)
    assert (local.min_actors, local.max_actors, local.gpus_per_actor) == (1, 2, 1)


def test_pool_bounds_are_checked():
    from labelmill.config import ConfigError, load_config

    base = run_config("x", "y")
    with pytest.raises(ConfigError, match="larger than max_actors"):
        load_config({**base, "ray": {"min_actors": 3, "max_actors": 2}})
    with pytest.raises(ConfigError, match="either teacher_actors"):
        load_config({**base, "ray": {"teacher_actors": 2, "max_actors": 2}})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a private PID namespace")
def test_run_scales_onto_fake_gpu_nodes_and_commits_exact_rows(tmp_path):
    shards = tmp_path / "shards"
    for s in range(6):
        write_shard(str(shards / f"s-{s:03d}.tar"), [gt_sample(f"{s}-{i}", seed=s * 10 + i) for i in range(4)])
    trace = tmp_path / "trace"
    trace.mkdir()
    cfg = run_config(str(shards), str(tmp_path / "out"), teachers=[gt_teacher(delay_s=3.0, trace_dir=str(trace))])
    # one call per actor: this workload queues only a few tasks, and Ray Data grows the pool once 1.75 x
    # infer_calls_per_actor of them wait per actor (a labelling run at scale queues far more)
    cfg["ray"] = {"batch_size": 1, "min_actors": 1, "max_actors": 2, "cpus_per_actor": 0.5, "read_cpus": 0.25,
                  "infer_calls_per_actor": 1}
    cfg["output"]["commit_every_shards"] = 2
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result_path = tmp_path / "result.json"
    ray_tmp = tempfile.mkdtemp(prefix="lm-", dir="/tmp")  # its own Ray temp dir, short (socket paths <= 107 B)
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(HERE / "autoscale_run.py"),
           str(cfg_path), str(result_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result_path.exists(), proc.stderr[-5000:]
    result = json.loads(result_path.read_text())
    assert result["rc"] == 0, result["stderr"]
    assert result["gpus_at_start"] == 0                      # the head has no GPU
    assert result["peak_gpu_nodes"] >= 2, result            # the autoscaler started GPU workers for the pool
    actors = list(trace.iterdir())
    assert len(actors) >= 2, [a.name for a in actors]        # the pool grew past one actor
    assert all(a.read_text() for a in actors)                # every label actor held a GPU
    samples = DeltaTable(str(tmp_path / "out" / "samples")).to_pandas()
    assert len(samples) == 24 and not samples.duplicated(["shard", "key"]).any()
    assert (samples.status == "labelled").all()
