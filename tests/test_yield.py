"""Yield table: pre-filter score histograms predict what each threshold keeps, without relabelling."""

from __future__ import annotations

import json
import random

import pytest

from helpers import make_shards, run_config
from labelmill.cli import main
from labelmill.config import FilterConfig
from labelmill.stages.filter import filter_labels
from labelmill.store.yields import THRESHOLDS, ScoreHist, image_entries, version_hist, yield_rows


def _random_image(rng: random.Random) -> list[dict]:
    labels = []
    for _ in range(rng.randint(0, 9)):
        labels.append({"teacher": rng.choice(["a", "b"]), "class_name": rng.choice(["cat", "dog", "sky"]),
                       "phrase": None, "score": rng.choice([rng.random(), 0.3, 0.5, 0.1]),
                       "area": rng.choice([10.0, 300.0, 5000.0])})
    return labels


@pytest.mark.parametrize("max_per_image", [None, 3])
def test_histograms_predict_the_filter_at_every_threshold(max_per_image):
    rng = random.Random(7)
    images = [_random_image(rng) for _ in range(300)]
    hist = ScoreHist()
    for labels in images:
        hist.add_image(image_entries(labels, 256, max_per_image))
    hist = ScoreHist.loads(hist.dumps())  # as stored
    rows = {(r["teacher"], r["class"]): r for r in yield_rows(hist)}
    for t in THRESHOLDS:
        cfg = FilterConfig(min_score=t, min_area=256, max_labels_per_image=max_per_image)
        kept = [filter_labels([dict(lab) for lab in labels], cfg)[0] for labels in images]
        assert rows[("*", "*")]["labels"][f"{t:g}"] == sum(len(k) for k in kept)
        assert rows[("*", "*")]["images"][f"{t:g}"] == sum(1 for k in kept if k)
        for teacher in "ab":
            for cls in ("cat", "dog", "sky"):
                mine = [[lab for lab in k if lab["teacher"] == teacher and lab["class_name"] == cls] for k in kept]
                row = rows.get((teacher, cls))
                assert (row["labels"][f"{t:g}"] if row else 0) == sum(len(m) for m in mine)
                assert (row["images"][f"{t:g}"] if row else 0) == sum(1 for m in mine if m)
    assert rows[("*", "*")]["labels_prefilter"] == sum(len(labels) for labels in images)


def test_replaced_groups_count_in_proportion_and_say_so():
    h = ScoreHist()
    h.add_image([("a", "cat", 0.55, True)] * 4)
    records = [
        {"version": 1, "kind": "commit", "shards_added": [{"shard": "s1"}, {"shard": "s2"}], "score_hist": h.to_json()},
        {"version": 2, "kind": "commit", "shards_added": [{"shard": "s3"}], "score_hist": h.to_json()},
        {"version": 3, "kind": "commit", "shards_added": [], "shards_removed": ["s2"]},
        {"version": 4, "kind": "rollback", "rolled_back_to": 2, "shards_added": [{"shard": "s2"}]},
    ]
    hist, exact = version_hist(records, 2)
    assert exact and hist.survivors("*\t*", "kept", 0.5) == 8
    hist, exact = version_hist(records, 3)
    assert not exact and hist.survivors("*\t*", "kept", 0.5) == 6
    hist, exact = version_hist(records, 4)
    assert exact and hist.survivors("*\t*", "kept", 0.5) == 8


def test_yield_at_the_runs_min_score_equals_the_kept_labels(tmp_path, ray_session, capsys):
    from labelmill.config import load_config
    from labelmill.pipelines.label import run
    from labelmill.store.commit import OutputStore

    make_shards(tmp_path / "shards", 3, 4)
    out = str(tmp_path / "out")
    cfg = load_config(run_config(str(tmp_path / "shards"), out,
                                 filter={"min_score": 0.2, "min_area": 64, "max_labels_per_image": 3}))
    summary = run(cfg)
    c = summary.counters
    assert c.labels_kept > 0 and sum(c.dropped.values()) > 0

    assert main(["yield", out, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["exact"] and table["version"] == 2
    total = next(r for r in table["rows"] if r["teacher"] == "*" and r["class"] == "*")
    assert total["labels"]["0.2"] == c.labels_kept
    assert total["images"]["0.2"] == c.labelled
    assert total["labels_prefilter"] == c.labels_kept + sum(c.dropped.values())
    per_class = [r for r in table["rows"] if r["teacher"] == "maskclip" and r["class"] != "*"]
    assert sum(r["labels"]["0.2"] for r in per_class) == c.labels_kept
    # the first version holds the first two shards only
    v1 = OutputStore(out).versions()[0]
    assert main(["yield", out, "--version", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rows"][-1]["labels"]["0.2"] == v1["counts"]["labels_kept"]
    assert main(["yield", out]) == 0
    text = capsys.readouterr().out
    assert ">=0.2" in text and f"{c.labels_kept:,}" in text
    # every run keeps its own histograms too
    runs = list((tmp_path / "out" / "_labelmill" / "runs").glob("*.json"))
    assert ScoreHist(json.loads(runs[0].read_text())["score_hist"]).survivors("*\t*", "kept", 0.2) == c.labels_kept
