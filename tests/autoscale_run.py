"""Run by tests/test_autoscaling.py inside its own PID namespace (never import it from a test).

Starts a fake autoscaling Ray cluster (a CPU head, GPU node types with
``min_workers: 0``), runs ``labelmill run`` against it by address and
writes what happened to a JSON file.  ``AutoscalingCluster.start`` runs
``ray stop --force``, which is why this runs where it can only see its own
processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import ray
from ray.cluster_utils import AutoscalingCluster

GPU_NODE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}


class FakeGPUCluster(AutoscalingCluster):
    """Our own cluster config (Ray's wheel does not ship the fake provider's example file)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        nodes = dict(worker_node_types)
        nodes["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "labelmill-fake-gpu",
            "max_workers": 2,
            "upscaling_speed": 2.0,
            "idle_timeout_minutes": 10,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": nodes,
            "head_node_type": "ray.head.default",
            "docker": {},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }


def main(config_path: str, result_path: str) -> int:
    cluster = FakeGPUCluster(head_resources={"CPU": 2}, worker_node_types={"gpu_worker": GPU_NODE})
    cluster.start()
    peak = {"gpu_nodes": 0}
    stop = threading.Event()
    try:
        ray.init(address="auto", configure_logging=False, log_to_driver=False)

        def watch() -> None:
            while not stop.is_set():
                alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]
                peak["gpu_nodes"] = max(peak["gpu_nodes"], len(alive))
                time.sleep(0.5)

        gpus_at_start = ray.cluster_resources().get("GPU", 0)
        threading.Thread(target=watch, daemon=True).start()
        address = ray.get_runtime_context().gcs_address
        run = subprocess.run([sys.executable, "-m", "labelmill", "run", config_path, f"ray.address={address}"],
                             capture_output=True, text=True, timeout=900)
        stop.set()
        result = {"rc": run.returncode, "stdout": run.stdout[-4000:], "stderr": run.stderr[-6000:],
                  "gpus_at_start": gpus_at_start, "peak_gpu_nodes": peak["gpu_nodes"]}
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()
    with open(result_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
