"""Nightly refresh on local Ray: three nights, each checked row by row against a from-scratch run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import gt_teacher, rect_annotations, encode, photo, run_config
from labelmill import data
from labelmill.config import load_config
from labelmill.exitcodes import EXIT_NOTHING_TO_DO, EXIT_PUBLISHED
from labelmill.io.shards import write_shard
from labelmill.pipelines.label import run
from labelmill.pipelines.refresh import refresh

SAMPLE_COLS = ["shard", "index", "key", "status", "num_labels", "dropped_low_score"]
LABEL_COLS = ["shard", "index", "key", "class_name", "score", "bbox", "area", "seg"]


def scored_sample(key: str, seed: int):
    """A sample whose JSON holds annotations with scores 0.3..0.9 (the test teacher replays them)."""
    anns = rect_annotations(64, 96, seed, n=3)
    for j, ann in enumerate(anns):
        ann["score"] = round(0.3 + 0.3 * ((seed + j) % 3), 2)
    return key, {"png": encode(photo(96, 64, seed), "PNG"), "txt": f"sample {key}".encode(),
                 "json": json.dumps({"annotations": anns}).encode()}


def write(folder: Path, s: int, version: int = 0, n: int = 3) -> str:
    return write_shard(str(folder / f"s-{s:03d}.tar"),
                       [scored_sample(f"{s}-{version}-{i}", seed=s * 100 + version * 10 + i) for i in range(n)])


def config(shards: Path, out: Path, min_score: float = 0.0) -> dict:
    cfg = run_config(str(shards), str(out), teachers=[gt_teacher(min_score=min_score)])
    cfg["output"]["commit_every_shards"] = 1  # a plain run commits shard by shard; a refresh still once
    cfg["ray"]["batch_size"] = 2
    return cfg


def rows(out: Path, version=None) -> dict:
    view = data.open(str(out), version)
    samples = view.read("samples").to_pandas()[SAMPLE_COLS]
    labels = view.read("labels").to_pandas()
    labels["seg"] = labels["segmentation"].map(lambda s: s["counts"] if s is not None else None)
    labels["bbox"] = labels["bbox"].map(lambda b: tuple(round(float(v), 4) for v in b))
    labels = labels[LABEL_COLS]
    return {
        "samples": sorted(map(tuple, samples.itertuples(index=False))),
        "labels": sorted(map(tuple, labels.itertuples(index=False))),
    }


def scratch(shards: Path, out: Path, min_score: float = 0.0) -> dict:
    run(load_config(config(shards, out, min_score)))
    return rows(out)


@pytest.mark.slow
def test_three_nights_match_from_scratch_runs(tmp_path, ray_session):
    shards, out = tmp_path / "shards", tmp_path / "out"
    for s in range(3):
        write(shards, s)

    # night 1: the first run
    s1 = refresh(load_config(config(shards, out)))
    assert s1["exit_code"] == EXIT_PUBLISHED and s1["shards"]["new"] == 3 and s1["version"] == 1
    assert rows(out) == scratch(shards, tmp_path / "scratch1")
    night1 = rows(out)

    # night 2: two shards added, one rewritten
    write(shards, 3)
    write(shards, 4)
    write(shards, 1, version=1, n=4)
    s2 = refresh(load_config(config(shards, out)))
    assert s2["exit_code"] == EXIT_PUBLISHED
    assert (s2["shards"]["new"], s2["shards"]["changed"], s2["shards"]["unchanged"]) == (2, 1, 2)
    assert s2["version"] == 2, "all of a night's changes are ONE version"
    assert rows(out) == scratch(shards, tmp_path / "scratch2")

    # night 3: one shard deleted, the teacher's threshold raised (every kept shard is stale)
    (shards / "s-000.tar").unlink()
    s3 = refresh(load_config(config(shards, out, min_score=0.5)))
    assert s3["exit_code"] == EXIT_PUBLISHED
    assert (s3["shards"]["deleted"], s3["shards"]["stale"]) == (1, 4) and s3["version"] == 3
    night3 = rows(out)
    assert night3 == scratch(shards, tmp_path / "scratch3", min_score=0.5)
    assert all(r[4] >= 0.5 for r in night3["labels"])

    # earlier versions stay readable as they were
    assert rows(out, 1) == night1

    # nothing changed: nothing published, exit 7, and a refresh record says so
    s4 = refresh(load_config(config(shards, out, min_score=0.5)))
    assert s4["exit_code"] == EXIT_NOTHING_TO_DO and s4["version"] is None and not s4["published"]
    assert [v["version"] for v in data.versions(str(out))] == [1, 2, 3]
    records = sorted((out / "_labelmill" / "refreshes").glob("*.json"))
    assert len(records) == 4
    assert sorted(json.loads(r.read_text())["exit_code"] for r in records) == [0, 0, 0, EXIT_NOTHING_TO_DO]


@pytest.mark.slow
def test_a_stricter_filter_is_reapplied_to_stored_labels_without_teachers(tmp_path, ray_session):
    shards, out = tmp_path / "shards", tmp_path / "out"
    for s in range(2):
        write(shards, s)
    assert refresh(load_config(config(shards, out)))["version"] == 1

    def strict(folder: Path) -> dict:
        cfg = config(shards, folder)
        cfg["filter"] = {"min_score": 0.5}
        return cfg

    from labelmill.pipelines.refresh import plan_only

    dry = plan_only(load_config(strict(out)))  # what tonight would do, shard by shard, and why; writes nothing
    assert dry["actions"]["refilter"] == 2 and len(data.versions(str(out))) == 1
    assert {p["action"] for p in dry["plan"]} == {"refilter"} and all("filter changed" in p["reason"]
                                                                         for p in dry["plan"])
    s2 = refresh(load_config(strict(out)))
    assert s2["actions"]["refilter"] == 2 and s2["actions"]["relabel"] == 0 and s2["version"] == 2
    assert s2["plan"] == dry["plan"]
    # a looser threshold cannot be re-applied to stored labels: it is said to need a relabel
    loose = plan_only(load_config(config(shards, out)))
    assert {p["action"] for p in loose["plan"]} == {"relabel"}
    # a night with nothing to do is on record too
    again = refresh(load_config(strict(out)))
    assert again["exit_code"] == EXIT_NOTHING_TO_DO and again["plan"] == []
    nights = [json.loads(p.read_text()) for p in (out / "_labelmill" / "refreshes").glob("*.json")]
    assert sorted(n["exit_code"] for n in nights) == sorted([0, 0, EXIT_NOTHING_TO_DO])
    assert "rows" in s2 and s2["rows"]["samples"] == 6
    got = rows(out)
    run(load_config(strict(tmp_path / "scratch")))
    assert got == rows(tmp_path / "scratch")
    assert all(r[4] >= 0.5 for r in got["labels"]) and any(r[5] > 0 for r in got["samples"])
