"""ray_cluster.yaml is a valid Ray cluster-launcher config with an autoscaling GPU worker."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_config_matches_rays_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu_types = [n for n, spec in nodes.items() if spec.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker type is required"
    for name in gpu_types:
        assert nodes[name]["min_workers"] < nodes[name]["max_workers"], "GPU workers must autoscale"
    assert any("pip install" in c and "labelmill" in c for c in config["setup_commands"])


def test_schema_rejects_a_broken_config():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["max_workers"] = "lots"
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("the schema check accepted a non-integer max_workers")
