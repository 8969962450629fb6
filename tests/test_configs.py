"""The example configs under configs/ validate, and the cluster launcher names one that exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from labelmill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.teachers and cfg.output.path


def test_cluster_launcher_names_an_existing_config():
    text = (ROOT / "ray_cluster.yaml").read_text()
    named = {w for line in text.splitlines() for w in line.split() if w.startswith("configs/")}
    assert named and all((ROOT / n).is_file() for n in named), named
    cluster = yaml.safe_load(text)
    cc3m = load_config(ROOT / "configs" / "cc3m.yaml")
    gpu_max = max(n.get("max_workers", 0) for n in cluster["available_node_types"].values()
                  if n.get("resources", {}).get("GPU", 0) >= 1)
    assert cc3m.ray.max_actors == gpu_max  # the pool can use every GPU node the launcher may start
