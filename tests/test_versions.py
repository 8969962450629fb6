"""versions, diff, rollback and vacuum (no Ray: versions are made by the commit loop directly)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

import labelmill.data
from labelmill.cli import main
from labelmill.engine import CommitLoop
from labelmill.exitcodes import EXIT_CONFIG, EXIT_INPUT, EXIT_LOCK_HELD
from labelmill.store.commit import OutputStore
from labelmill.store.lock import OutputLock
from labelmill.store.read import VersionNotFound
from labelmill.store.versions import describe_versions, diff_versions, vacuum
from test_store import feed, rows, sorted_df, staged


def three_versions(out: str) -> OutputStore:
    """v1: shard a; v2: shard b; v3: shard a rewritten (5 rows, 1 label each) and b deleted."""
    store = OutputStore(out)
    loop = CommitLoop(store, 1, fingerprints={"a": {"size": 1, "mtime": "1"}, "b": {"size": 1, "mtime": "1"}})
    feed(loop, out, "a", 3)
    feed(loop, out, "b", 3)
    store.commit(staged(out, rows("a", 5, labels_per_row=1)).to_pylist(),
                 [{"shard": "a", "fingerprint": {"size": 2, "mtime": "2"}}], remove_shards=["a", "b"])
    return store


def test_versions_and_diff(tmp_path, capsys):
    out = str(tmp_path / "out")
    three_versions(out)
    listed = describe_versions(out)
    assert [v["version"] for v in listed] == [1, 2, 3]
    assert [(v["shards"]["new"], v["shards"]["changed"], v["shards"]["deleted"]) for v in listed] == \
        [(1, 0, 0), (1, 0, 0), (0, 1, 1)]
    assert [v["shards_total"] for v in listed] == [1, 2, 1]
    assert main(["versions", out, "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1, 2, 3]
    assert main(["versions", out]) == 0 and "version" in capsys.readouterr().out

    d = diff_versions(out, 2, 3)
    assert d["shards"] == {"in": [], "out": ["b"], "relabelled": ["a"]}
    # v2: 2 shards x (1 error + 2 labelled samples x 2 labels); v3: 4 labelled samples x 1 label
    assert d["labels"] == {"a": 8, "b": 4, "change": -4}
    assert d["status"]["error"] == {"a": 2, "b": 1, "change": -1}
    assert d["classes"]["cat"]["change"] == -4
    assert d["score"]["mean_shift"] == pytest.approx(0.0, abs=1e-6)
    assert main(["diff", out, "1", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"]["relabelled"] == ["a"]


def test_rollback_publishes_a_new_version_equal_to_an_old_one(tmp_path, capsys):
    out = str(tmp_path / "out")
    three_versions(out)
    v2 = sorted_df(out, "samples", 2)
    labels2 = sorted_df(out, "labels", 2)
    assert main(["rollback", out, "2"]) == 0
    assert "published version 4" in capsys.readouterr().out
    assert sorted_df(out, "samples").equals(v2) and sorted_df(out, "labels").equals(labels2)
    assert OutputStore(out).committed_shards() == {"a": {"size": 1, "mtime": "1"}, "b": {"size": 1, "mtime": "1"}}
    assert main(["rollback", out, "9"]) == EXIT_INPUT
    with OutputLock(out, command="test"):
        assert main(["rollback", out, "1"]) == EXIT_LOCK_HELD
    assert [v["version"] for v in labelmill.data.versions(out)] == [1, 2, 3, 4]


def _data_files(out: str) -> set[str]:
    from pathlib import Path

    return {str(p) for t in ("samples", "labels") for p in Path(out, t).glob("*.parquet")}


def test_vacuum_keeps_exactly_what_kept_versions_read(tmp_path, capsys):
    out = str(tmp_path / "out")
    store = three_versions(out)
    assert main(["rollback", out, "2"]) == 0  # v4 reads v1's and v2's files again
    capsys.readouterr()
    before = {v: (sorted_df(out, "samples", v), sorted_df(out, "labels", v)) for v in (3, 4)}
    leftover = tmp_path / "out" / "samples" / "_staging" / "part-left.parquet"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x")
    files = _data_files(out)

    assert main(["vacuum", out]) == EXIT_CONFIG  # neither --keep-versions nor --older-than
    dry = vacuum(out, keep_versions=1)
    assert dry["kept_versions"] == [4] and not dry["applied"]
    assert _data_files(out) == files and leftover.exists(), "a dry run deletes nothing"
    # keep v3 and v4: the files of v3's shard a (rewritten) and v1/v2's (restored by v4) all stay;
    # nothing is deleted because every data file is read by a kept version
    both = vacuum(out, keep_versions=2, apply=True)
    assert both["files"] == [] and not leftover.exists() and both["staging_files"] == 1
    # keep v4 only: v3's rewrite of shard a is read by no kept version and goes
    v3_only = {f for f in files if f.endswith(".parquet")} - set(labelmill.data.open(out, 4).files("samples")) \
        - set(labelmill.data.open(out, 4).files("labels"))
    assert main(["vacuum", out, "--keep-versions", "1", "--yes", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {f for f in report["files"] if "/stats/" not in f} == v3_only and v3_only
    assert _data_files(out) == files - v3_only
    assert sorted_df(out, "samples", 4).equals(before[4][0]) and sorted_df(out, "labels", 4).equals(before[4][1])
    with pytest.raises(VersionNotFound, match="vacuumed"):
        labelmill.data.open(out, 3)
    assert [v["readable"] for v in describe_versions(out)] == [False, False, False, True]
    with OutputLock(out, command="test"):
        assert main(["vacuum", out, "--keep-versions", "1", "--yes"]) == EXIT_LOCK_HELD
    assert store.latest()["version"] == 4


def test_time_travel_after_vacuum_within_retention(tmp_path):
    out = str(tmp_path / "out")
    three_versions(out)
    records = OutputStore(out).versions()
    t2, t3 = (datetime.fromisoformat(r["time"]) for r in (records[1], records[2]))
    between = t2 + (t3 - t2) / 2
    want = sorted_df(out, "labels", 2)
    # retention starts between v2 and v3: v2 was current then and stays readable; v1 does not
    result = vacuum(out, older_than_days=0, apply=True, now=between)
    assert result["kept_versions"] == [2, 3] and result["vacuumed_versions"] == [1]
    assert sorted_df(out, "labels", between.isoformat()).equals(want)
    assert sorted_df(out, "labels", 2).equals(want)
    with pytest.raises(VersionNotFound):
        labelmill.data.open(out, (t2 - timedelta(microseconds=1)).isoformat())


def test_report_shows_changes_since_the_previous_version(tmp_path):
    from labelmill.export.report import write_report

    out = str(tmp_path / "out")
    three_versions(out)
    page = (tmp_path / "r.html")
    write_report(out, str(page), max_images=0)
    text = page.read_text()
    assert "Changes since version 2" in text and "out: 1, relabelled: 1" in text and "labels 8 &rarr; 4" in text
    write_report(out, str(page), max_images=0, version=1)
    assert "first version" in page.read_text()


def test_version_stats_stream_and_match_numpy_on_every_score():
    """diff's statistics are streamed in batches: its 10-bin histogram equals numpy's over all scores, and its
    percentiles are within one fine bin of numpy's, on scores that sit on the bin edges too."""
    import numpy as np
    import pyarrow as pa

    from labelmill.store.versions import FINE_BINS, SCORE_BINS, _version_stats

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.uniform(0, 1, 5000), np.linspace(0, 1, 11), [np.nan]]).astype(np.float32)
    names = rng.choice(["cat", "dog", None], scores.size)
    labels = pa.table({"class_name": pa.array(names.tolist(), pa.string()), "score": pa.array(scores)})

    class View:  # a version whose labels come in batches of 700 rows
        def table_names(self):
            return ["labels"]

        def iter_batches(self, table, columns, batch_size):
            yield from labels.select(columns).to_batches(max_chunksize=700)

    got = _version_stats(View())
    good = scores[~np.isnan(scores)].astype(float)
    assert got["labels"] == good.size == 5011
    assert got["score"]["histogram"] == np.histogram(good, SCORE_BINS)[0].tolist()
    for q in (10, 50, 90):
        assert abs(got["score"][f"p{q}"] - np.percentile(good, q)) <= 1.5 / FINE_BINS
    assert got["score"]["mean"] == pytest.approx(good.mean())
    assert got["classes"] == {k: int((names == k).sum()) for k in ("cat", "dog")} | {"None": int((names == None).sum())}  # noqa: E711
