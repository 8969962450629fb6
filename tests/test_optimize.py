"""``labelmill optimize``: the same rows in fewer files, as one version; and what the nights after it do to
group files (copy on write).  Every version, before and after, reads exactly the rows it read before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deltalake import DeltaTable

import labelmill.data
from labelmill.engine import CommitLoop
from labelmill.schemas.tables import Col
from labelmill.store.commit import OutputStore
from labelmill.store.optimize import optimize
from labelmill.store.refresh_plan import LabelInputs, committed_from_records, inputs_key, plan_refresh
from test_store import rows, staged, with_regions

TABLES = ("samples", "labels", "regions", "stats")


def snapshot(out: str, version: int) -> dict[str, list]:
    """Every table's rows of ``version``, in a canonical order (file layout must not matter)."""
    ds = labelmill.data.open(out, version)
    got = {}
    for t in TABLES:
        if t not in ds.table_names():
            continue
        table = ds.read(t)
        keys = [k for k in ("shard", "index", "commit", "teacher", "class_name") if k in table.column_names]
        rows_ = table.drop_columns([c for c in table.column_names if c in ("committed_at",)]).to_pylist()
        got[t] = sorted(rows_, key=lambda r: (tuple(str(r[k]) for k in keys), json.dumps(r, sort_keys=True,
                                                                                         default=str)))
    return got


def shard_rows(shard: str, n: int, start: int = 0):
    return with_regions(rows(shard, n, start=start))


def build(out: str, shards: list[str]) -> OutputStore:
    store = OutputStore(out)
    loop = CommitLoop(store, 1)
    for i, s in enumerate(shards):
        loop.add(staged(out, shard_rows(s, 3 + i % 3)))
        loop.shard_read(s, 3 + i % 3, 0)
    loop.finish()
    return store


def live_files(out: str, table: str, version: int | None = None) -> list[str]:
    return labelmill.data.open(out, version).paths(table)


def test_optimize_packs_groups_and_every_version_reads_the_same_rows(tmp_path, monkeypatch):
    from labelmill.store import commit

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 3)  # checkpoints before, at and after the rewrite
    out = str(tmp_path / "out")
    shards = [f"s{i:02d}" for i in range(7)]
    store = build(out, shards)
    before = {r["version"]: snapshot(out, r["version"]) for r in store.versions()}
    latest = max(before)
    assert len(live_files(out, "labels")) == 7 and len(live_files(out, "stats")) == 7

    dry = optimize(out, group_shards=3, dry_run=True)
    assert dry["version"] is None and [v["version"] for v in labelmill.data.versions(out)][-1] == latest
    assert [(g["table"], g["shards"], g["first_shard"], g["last_shard"]) for g in dry["groups"]
            if g["table"] == "labels"] == [("labels", 3, "s00", "s02"), ("labels", 3, "s03", "s05")]

    result = optimize(out, group_shards=3)
    v = result["version"]
    assert v == latest + 1
    record = labelmill.data.versions(out)[-1]
    assert record["kind"] == "optimize" and record["shards_added"] == [] and record["shards_removed"] == []
    # 7 shards in groups of 3: s00-s02, s03-s05 and s06 alone (a single file is left as it is)
    for t in ("samples", "labels", "regions"):
        assert len(live_files(out, t)) == 3, t
        assert result["tables"][t]["files_after"] == 3
    assert len(live_files(out, "stats")) == 1  # no shards: packed by size
    assert snapshot(out, v) == before[latest]
    for version, want in before.items():  # pinned versions read their own files, unchanged
        assert snapshot(out, version) == want
    # a Delta reader sees the rewrite as no change of data
    log = os.path.join(out, "labels", "_delta_log")
    last = sorted(n for n in os.listdir(log) if n.endswith(".json"))[-1]
    actions = [json.loads(line) for line in open(os.path.join(log, last))]
    changes = [a.get("add", a.get("remove")) for a in actions if "add" in a or "remove" in a]
    assert changes and all(c["dataChange"] is False for c in changes)
    assert len(DeltaTable(os.path.join(out, "labels")).to_pyarrow_table()) == sum(
        len(x) for x in [before[latest]["labels"]])
    # one shard of a group file reads alone, and the shard iterator yields each shard once
    ds = labelmill.data.open(out, v)
    assert sorted(ds.read_shard("samples", "s04").column(Col.INDEX).to_pylist()) == list(range(4))
    assert ds.read_shard("samples", "zz") is None
    seen = [s for s, _ in ds.iter_shards("samples")]
    assert seen == shards
    # nothing left to pack: no new version
    again = optimize(out, group_shards=3)
    assert again["version"] is None and labelmill.data.versions(out)[-1]["version"] == v


def test_nights_after_optimize_rewrite_group_files_without_the_removed_shards(tmp_path):
    out = str(tmp_path / "out")
    shards = [f"s{i:02d}" for i in range(6)]
    store = build(out, shards)
    optimize(out, group_shards=3)
    store = OutputStore(out)
    packed = store.versions()[-1]["version"]
    at_packed = snapshot(out, packed)
    # a night: s01 relabelled (new rows), s04 deleted, s09 new
    manifests = [*staged(out, shard_rows("s01", 2, start=10)).to_pylist(),
                 *staged(out, shard_rows("s09", 2)).to_pylist()]
    record = store.commit(manifests, [{"shard": "s01", "fingerprint": {"g": 1}}, {"shard": "s09", "fingerprint": {}}],
                          remove_shards=["s01", "s04"], kind="refresh")
    assert record["rows_added"]["samples"] == 4  # the rewritten group rows are not new rows
    night = snapshot(out, record["version"])
    samples = night["samples"]
    by_shard = {}
    for r in samples:
        by_shard.setdefault(r["shard"], []).append(r["index"])
    assert sorted(by_shard) == ["s00", "s01", "s02", "s03", "s05", "s09"]
    assert sorted(by_shard["s01"]) == [10, 11]
    for s in ("s00", "s02", "s03", "s05"):  # untouched shards keep every row, exactly
        assert [r for r in samples if r["shard"] == s] == [r for r in at_packed["samples"] if r["shard"] == s]
    for t in ("labels", "regions"):
        assert not any(r["shard"] == "s04" for r in night[t])
        assert sorted({r["index"] for r in night[t] if r["shard"] == "s01"}) == [10, 11]
    assert snapshot(out, packed) == at_packed  # the optimized version is pinned as it was
    ds = labelmill.data.open(out, record["version"])  # group files and a worker's files side by side
    assert sorted(s for s, _ in ds.iter_shards("samples")) == sorted(by_shard)
    assert sorted(ds.read_shard("labels", "s01").column(Col.INDEX).unique().to_pylist()) == [10, 11]
    assert sorted(ds.read_shard("labels", "s02").column(Col.INDEX).unique().to_pylist()) == [1, 2, 3, 4]
    # the plan of the next night sees exactly the committed shards
    assert set(store.committed_shards()) == {"s00", "s01", "s02", "s03", "s05", "s09"}
    # rollback to before the optimize brings back the per-shard files
    store.rollback(packed - 1)
    assert snapshot(out, store.versions()[-1]["version"]) == snapshot(out, packed - 1)


def test_cli_optimize(tmp_path):
    out = str(tmp_path / "out")
    build(out, ["a", "b", "c"])
    cmd = [sys.executable, "-m", "labelmill.cli", "optimize", out, "--group-shards", "2"]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stdout + dry.stderr
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version"] == 4 and result["tables"]["samples"]["files_after"] == 2
    bad = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run([sys.executable, "-m", "labelmill.cli", "optimize", str(empty)], capture_output=True, text=True)
    assert none.returncode != 0 and "no committed dataset version" in none.stderr and "Traceback" not in none.stderr
    assert list(empty.iterdir()) == []  # nothing written into a folder that holds no output


def test_the_plan_from_compacted_cached_records_equals_the_plan_from_the_full_history(tmp_path, monkeypatch):
    """The planner reads the store's state (the latest snapshot plus the records after it); its plan equals
    the plan from every record as each commit returned it, and from the compacted history."""
    from labelmill.store import commit

    monkeypatch.setattr(commit, "COMPACT_VERSIONS_EVERY", 3)
    today = LabelInputs(teachers={"t": "1"}, shared="s", filter={"min_score": 0.3, "per_class_min_score": {},
                                                                  "min_area": 0.0, "max_labels_per_image": None})
    key = inputs_key(today)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    history = []

    def item(s, g):
        return {"shard": s, "fingerprint": _fp(g).to_dict(), "inputs": key}

    listing = {f"s{i}": 0 for i in range(8)}
    for i, s in enumerate(listing):
        history.append(store.commit(staged(out, rows(s, 2)).to_pylist(), [item(s, 0)],
                                    info={"label_inputs": {key: today.to_dict()}}))
    history.append(store.commit(staged(out, rows("s1", 2)).to_pylist(), [item("s1", 5)], remove_shards=["s1", "s2"]))
    history.append(store.rollback(history[5]["version"]))
    optimize(out, group_shards=2)
    store = OutputStore(out)
    history.append(store.versions()[-1])
    history.append(store.commit(staged(out, rows("s3", 2)).to_pylist(), [item("s3", 7)], remove_shards=["s3"]))
    listing.update({"s3": 8, "s9": 1})
    listing.pop("s4")

    def plan(records):
        committed = committed_from_records(OutputStore.shard_items(records), OutputStore.label_inputs(records))
        return plan_refresh({s: _fp(g) for s, g in listing.items()}, committed, today)

    full = plan(history)
    assert [r["version"] for r in history] == [r["version"] for r in store.versions()]
    assert len(DeltaTable(os.path.join(out, "_labelmill", "versions")).file_uris()) < len(history) / 2  # compacted
    for records in (store.versions(), OutputStore(out).versions()):  # the compacted history, writer and fresh
        got = plan(records)
        assert (got.to_label, got.to_remove, got.details()) == (full.to_label, full.to_remove, full.details())
    for state in (store.state(), OutputStore(out).state()):  # what refresh plans from: snapshot + records after
        got = plan_refresh({s: _fp(g) for s, g in listing.items()},
                           committed_from_records(state.shards, state.label_inputs), today)
        assert (got.to_label, got.to_remove, got.details()) == (full.to_label, full.to_remove, full.details())
    assert os.listdir(os.path.join(out, "_labelmill", "state"))  # snapshots were written (every 3 versions)
    # the rollback to version 6 dropped s6, s7 and s1's new rows (s1 is back at its first fingerprint)
    assert full.to_label == ["s3", "s6", "s7", "s9"] and full.to_remove == ["s3", "s4"]


def _fp(generation: int):
    from labelmill.io.shards import Fingerprint

    return Fingerprint(size=100 + generation, mtime="0")


def test_an_optimize_killed_mid_commit_is_repaired_to_the_version_before(tmp_path, monkeypatch):
    """Killed after the labels table took its group files but before the version record: readers never see
    the half-made version, and the next writer's repair puts every table back and deletes the group files."""
    import pytest

    from labelmill.store.commit import DeltaLog

    out = str(tmp_path / "out")
    build(out, ["a", "b", "c", "d"])
    latest = labelmill.data.versions(out)[-1]["version"]
    want = snapshot(out, latest)
    real = DeltaLog.commit

    def dies_after_labels(self, *args, **kwargs):
        if self.name == "samples":
            raise KeyboardInterrupt("simulated kill")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeltaLog, "commit", dies_after_labels)
    with pytest.raises(KeyboardInterrupt):
        optimize(out, group_shards=4)
    monkeypatch.setattr(DeltaLog, "commit", real)
    assert labelmill.data.versions(out)[-1]["version"] == latest and snapshot(out, latest) == want
    store = OutputStore(out)
    report = store.repair()
    assert report["tables_restored"] >= 1 and report["uncommitted_files"] >= 1
    assert snapshot(out, latest) == want
    # plain Parquet and Delta readers of the folder see the rows of the version, nothing of the half optimize
    import pandas as pd

    assert len(pd.read_parquet(os.path.join(out, "labels"))) == len(want["labels"])
    assert len(DeltaTable(os.path.join(out, "labels")).to_pyarrow_table()) == len(want["labels"])
    assert optimize(out, group_shards=4)["version"] == latest + 1  # and it can run again
    assert snapshot(out, latest + 1) == want
