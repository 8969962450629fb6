"""`labelmill run CONFIG --dry-run [--json]`: an estimate measured on this machine, nothing written."""

from __future__ import annotations

import json
import os

import yaml

from helpers import make_shards, run_config
from labelmill.cli import main


def test_dry_run_json_estimates_from_sampled_shards_and_a_timed_batch(tmp_path, capsys):
    make_shards(tmp_path / "shards", 5, 4)
    cfg = run_config(str(tmp_path / "shards"), str(tmp_path / "out"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run", "--json", "--sample-shards", "2",
                 "ray.max_actors=4", "ray.gpus_per_actor=1"]) == 0
    e = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert e["config_ok"] and e["shards"] == 5 and len(e["shards_sampled"]) == 2
    assert e["samples_in_sampled_shards"] == [4, 4] and e["samples_estimated"] == 20
    assert set(e["seconds_per_image"]) == {"maskclip"} and e["seconds_per_image"]["maskclip"] > 0
    assert e["timed_images"] >= 2 and e["measured_device"] == "cpu"
    # the plan from the config: 4 actors with a GPU each
    assert e["cluster"]["label_actors"] == 4 and e["cluster"]["gpus_per_actor"] == 1
    actor_h = 20 * e["seconds_per_image_all_teachers"] / 3600
    assert abs(e["actor_hours"] - actor_h) < 1e-3 and abs(e["hours"] - actor_h / 4) < 1e-3
    assert e["gpu_hours"] == e["actor_hours"] and e["note"]
    # storage from the encoded tables of the timed batch, scaled to the input
    assert e["storage_bytes"]["samples"] > 0 and e["storage_bytes"]["labels"] > 0
    assert e["storage_bytes_total"] == sum(e["storage_bytes"].values()) or \
        abs(e["storage_bytes_total"] - sum(e["storage_bytes"].values())) <= len(e["storage_bytes"])
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing


def test_dry_run_json_reports_the_operators_as_the_engine_runs_them(tmp_path, capsys):
    """On a GPU plan the device operator holds only infer; the CPU pools are their own operators."""
    make_shards(tmp_path / "shards", 2, 3)
    cfg = run_config(str(tmp_path / "shards"), str(tmp_path / "out"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run", "--json", "--sample-shards", "1", "--actors", "16",
                 "ray.gpus_per_actor=1", "ray.host_cpus_per_gpu=6"]) == 0
    e = json.loads(capsys.readouterr().out)
    ops = {op["name"]: op for op in e["operators"]}
    assert [op["stages"] for op in e["operators"]] == [["read", "prepare"], ["infer"], ["finish", "filter", "write"]]
    assert ops["infer"]["resources"]["GPU"] == 1 and ops["infer"]["actors"] == {"min": 16, "max": 16}
    assert ops["infer"]["calls_per_actor"] == 2 and ops["finish"]["calls_per_actor"] == 1
    assert ops["finish"]["resources"]["GPU"] == 0 and ops["finish"]["actors"]["max"] == 48  # 6 CPUs x 16 GPUs / 2
    assert ops["read"]["kind"] == "tasks" and ops["read"]["concurrency"] == 48
    assert e["cluster"]["label_actors"] == 16 and e["prepare_seconds_per_image"] > 0
    assert e["finish_seconds_per_image"] > 0 and not os.path.exists(tmp_path / "out")
