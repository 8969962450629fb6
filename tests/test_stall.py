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
from labelmill.exitcodes import EXIT_CONFIG, EXIT_ERROR

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


def test_a_plan_no_node_can_hold_is_refused_before_work(tmp_path):
    """An infer actor asking for a resource no node has, on a cluster no autoscaler can grow: a config error
    naming it, before any work (it used to wait until the stall timeout)."""
    make_shards(tmp_path / "in", 1, 2)
    cfg = run_config(str(tmp_path / "in"), str(tmp_path / "out"))
    cfg["ray"].update(num_cpus=2, actor_resources={"teacher_node": 1}, stall_timeout_s=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "labelmill", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("labelmill: config error: the resource plan fits on no node") and \
        "teacher_node: 1" in last, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "labels").exists()


def test_an_autoscaler_that_cannot_provide_the_resource_is_not_waited_for(monkeypatch):
    import labelmill.engine.executor as executor

    now = [0.0]
    monkeypatch.setattr(executor.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    requests = {"infer": {"CPU": 1.0, "GPU": 1.0}}
    watch = StallWatch(60, requests, True, out, nodes=lambda: [CPU_NODE], limits={"CPU": 64.0, "GPU": 0.0})
    now[0] = 61
    with pytest.raises(PipelineStalled, match="no autoscaler can add such a node"):
        watch.check()
    assert "waiting for nodes" not in out.getvalue()


def test_placement_check_before_work():
    from labelmill.config import ConfigError, RayConfig
    from labelmill.engine.executor import Engine, Pipeline
    from labelmill.stages.base import Resources, Stage

    class Source(Stage):
        name, role = "read", "source"

        def process_batch(self, batch):
            return batch

    class Infer(Source):
        name, role, stateful = "infer", "model", True

    infer = Infer()
    infer.place(Resources(cpus=1.0, gpus=1.0))
    engine = Engine(RayConfig(), batch_size=4)
    pipe = Pipeline("p", [Source(), infer])
    with pytest.raises(ConfigError, match=r"infer workers need \{CPU: 1, GPU: 1\}.*no node has \{GPU: 1\}"):
        engine.check_placeable(pipe, [CPU_NODE], None)
    engine.check_placeable(pipe, [CPU_NODE], {"GPU": 8.0})  # an autoscaler can start a GPU node: wait for it
    with pytest.raises(ConfigError):
        engine.check_placeable(pipe, [CPU_NODE], {"GPU": 0.0})


@pytest.mark.slow
def test_node_death_mid_run_fails_within_the_stall_timeout(tmp_path):
    """The infer actors' only node dies mid-run on a cluster that cannot replace it: one line, exit 1, within
    twice ray.stall_timeout_s (it used to print "waiting for nodes" and then hang)."""
    import time

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1, resources={"teacher_node": 1})
    try:
        make_shards(tmp_path / "in", 24, 8)
        cfg = run_config(str(tmp_path / "in"), str(tmp_path / "out"))
        cfg["ray"].update(address=cluster.address, actor_resources={"teacher_node": 1}, stall_timeout_s=15,
                          batch_size=2)
        cfg["progress_interval_s"] = 0.5
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "labelmill", "run", str(path)], env=env,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        lines = []
        for line in proc.stderr:  # remove the node once the run streams (its actor starting there, shards read)
            lines.append(line)
            if " samples " in line and "read " in line:
                break
        cluster.remove_node(node)
        killed = time.monotonic()
        _, rest = proc.communicate(timeout=180)
        waited = time.monotonic() - killed
        err = "".join(lines) + rest
        assert proc.returncode == EXIT_ERROR, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("labelmill: pipeline stalled") and "teacher_node: 1" in last, err[-3000:]
        assert waited < 2 * 15 + 60, waited  # the stall timeout plus Ray's own detection of the dead node
        # a head started by `ray start` runs a monitor that reads as an autoscaler, so the watch may first say
        # it waits for nodes; either way the run fails within twice the timeout, naming what is missing
        assert "no autoscaler can add such a node" in last or "the cluster autoscaler added no such node" in last
        assert "Traceback" not in err
    finally:
        cluster.shutdown()


def test_no_gpu_and_no_autoscaler_plans_for_cpu(monkeypatch):
    """device: auto on a cluster reached by address, with no GPU node and no autoscaler: a CPU plan, not an
    actor waiting for a GPU that cannot come; the actor's CPUs fit the largest node."""
    import labelmill.engine.executor as executor
    from labelmill.config import RayConfig
    from labelmill.engine.executor import Engine, Pipeline
    from labelmill.stages.base import Stage

    class Source(Stage):
        name, role = "read", "source"

        def process_batch(self, batch):
            return batch

    class Infer(Source):
        name, role, stateful, wants_gpu = "infer", "model", True, True

    monkeypatch.setattr(executor, "cluster_max_gpus", lambda: None)
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 1.0}}]
    engine, pipe = Engine(RayConfig(), batch_size=4), Pipeline("p", [Source(), Infer()])
    plan = engine.place(pipe, {"CPU": 3.0}, True, nodes, no_autoscaler=True)
    assert plan.gpus_per_actor == 0 and plan.cpus_per_actor <= 2.0
    assert engine.place(pipe, {"CPU": 3.0}, True, nodes).gpus_per_actor == 1  # unknown: an autoscaler may add one
    monkeypatch.setattr(executor, "cluster_max_gpus", lambda: 8.0)  # an autoscaler with GPU node types
    assert engine.place(pipe, {"CPU": 3.0}, True, nodes).gpus_per_actor == 1
