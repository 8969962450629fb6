"""Student training: a pinned dataset version -> Ray Data -> Ray Train -> a student checkpoint.

``train(task, cfg)`` composes the pieces of :mod:`labelmill.training`: the
task's ``prepare`` (pin the version, check labels and vocabulary, build the
streamed dataset) and the shared Ray Train ``fit``.
"""

from __future__ import annotations

from labelmill.config import RayConfig
from labelmill.engine.runtime import start_ray
from labelmill.training.data import quiet_ray_data
from labelmill.training.loop import check_cluster_fits, fit


def train(cfg) -> dict:
    if cfg.task == "maskclip-plus":
        from labelmill.training.maskclip_plus import prepare
    else:
        from labelmill.training.glip import prepare
    started_here, remote = start_ray(RayConfig(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus))
    if started_here and not remote:  # a fixed local cluster: its size is known (an autoscaler may grow others)
        check_cluster_fits(cfg)
    quiet_ray_data()
    datasets, extra = prepare(cfg)
    result = fit(cfg, datasets, extra)
    result["dataset"] = extra.get("provenance", {})
    return result
