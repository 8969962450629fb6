"""The store and the commit loop without Ray: workers' manifests in, one dataset version per group.

Rows are turned into staged files by the real worker-side writer
(``WriteTables.process_batch``), so these tests cover what a worker does
and what the driver commits.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

import labelmill.data
from labelmill.engine import CommitLoop
from labelmill.schemas.tables import LABEL_STRUCT, REGION_STRUCT, TABLES, Col
from labelmill.stages.write import WriteTables
from labelmill.store.commit import OutputConflictError, OutputStore

PROV = json.dumps({"t": {"teacher": "t", "teacher_type": "maskclip", "weights": "w", "weights_sha256": "abc",
                          "teacher_config_hash": "h"}})


def rows(shard: str, n: int, labels_per_row: int = 2, start: int = 0) -> pa.Table:
    """Rows as the label + filter stages hand them to the writer (index 0 is an error sample)."""
    recs = []
    for i in range(start, start + n):
        labs = [{"teacher": "t", "kind": "box", "class_id": 1, "class_name": "cat", "phrase": None,
                 "tokens_positive": None, "caption": None, "score": 0.9, "bbox": [1, 2, 3, 4], "area": 12.0,
                 "segmentation": None}] * labels_per_row
        recs.append({Col.KEY: f"k{i}", Col.SHARD: shard, Col.INDEX: i, Col.ERROR: "bad" if i == 0 else None,
                     Col.WARNINGS: [], Col.CAPTION: "c", Col.ORIG_H: 10, Col.ORIG_W: 20, Col.META_JSON: None,
                     Col.LABELS: [] if i == 0 else labs, Col.REGIONS: [], Col.PROVENANCE: PROV,
                     Col.DROPPED_LOW_SCORE: 1, Col.DROPPED_SMALL_AREA: 0, Col.DROPPED_OVER_MAX: 0})
    schema = pa.schema([(Col.KEY, pa.string()), (Col.SHARD, pa.string()), (Col.INDEX, pa.int64()),
                        (Col.ERROR, pa.string()), (Col.WARNINGS, pa.list_(pa.string())), (Col.CAPTION, pa.string()),
                        (Col.ORIG_H, pa.int32()), (Col.ORIG_W, pa.int32()), (Col.META_JSON, pa.string()),
                        (Col.LABELS, pa.list_(LABEL_STRUCT)), (Col.REGIONS, pa.list_(REGION_STRUCT)),
                        (Col.PROVENANCE, pa.string()), (Col.DROPPED_LOW_SCORE, pa.int32()),
                        (Col.DROPPED_SMALL_AREA, pa.int32()), (Col.DROPPED_OVER_MAX, pa.int32())])
    return pa.Table.from_pylist(recs, schema=schema)


def staged(out: str, table: pa.Table) -> pa.Table:
    """What the workers send back for ``table``: manifest rows (files already staged)."""
    return WriteTables(out, {}, "zstd", "cfg", "run", "0.0").process_batch(table)


def feed(loop: CommitLoop, out: str, shard: str, n: int, **kw) -> None:
    """A whole shard: its rows through the writer, then the source's count."""
    loop.add(staged(out, rows(shard, n, **kw)))
    loop.shard_read(shard, n, 0)


def sorted_df(out, name, version=None):
    df = labelmill.data.open(out, version).read(name).to_pandas()
    return df.sort_values(["shard", "index"]).reset_index(drop=True)


def test_manifests_in_any_order_commit_one_version_per_group(tmp_path):
    out = str(tmp_path / "out")
    store = OutputStore(out)
    loop = CommitLoop(store, 2, fingerprints={"s1": {"size": 10}}, info={"config_hash": "cfg", "run_id": "run"})
    loop.add(staged(out, rows("s1", 3)))
    loop.shard_read("s2", 2, 1)               # the source finished s2 before any of its rows arrived
    loop.add(staged(out, rows("s2", 2)))
    assert store.done_shards() == set()       # s1 is not complete yet
    loop.add(staged(out, rows("s1", 2, start=3)))
    loop.shard_read("s1", 5, 0)
    assert store.done_shards() == {"s1", "s2"}
    feed(loop, out, "s3", 1)
    loop.finish()
    versions = labelmill.data.versions(out)
    assert [v["version"] for v in versions] == [1, 2]
    first = versions[0]
    assert sorted(s["shard"] for s in first["shards_added"]) == ["s1", "s2"]
    assert {s["shard"]: s["fingerprint"] for s in first["shards_added"]}["s1"] == {"size": 10}
    assert first["counts_by_status"] == {"labelled": 5, "no_labels": 0, "error": 2}
    assert first["counts"]["duplicates"] == 1 and first["config_hash"] == "cfg"
    assert set(first["table_versions"]) == {"labels", "samples", "stats"}  # no regions in this group

    samples = sorted_df(out, "samples")
    assert len(samples) == 8 and samples.groupby("shard").size().to_dict() == {"s1": 5, "s2": 2, "s3": 1}
    assert set(samples.status) == {"error", "labelled"}
    # the same rows through Delta and plain Parquet readers
    assert len(DeltaTable(f"{out}/samples").to_pandas()) == 8
    labels = pd.read_parquet(f"{out}/labels")
    assert len(labels) == 2 * 5 and (labels.weights_sha256 == "abc").all()
    stats = DeltaTable(f"{out}/stats").to_pandas()
    assert stats.samples.sum() == 8 and stats.dropped_low_score.sum() == 8 and stats.duplicates.sum() == 1
    assert sorted(stats["commit"]) == [1, 2]


def test_driver_receives_only_small_manifests(tmp_path):
    out = str(tmp_path / "out")
    table = rows("s1", 32, labels_per_row=20)
    manifests = staged(out, table)
    assert manifests.num_rows == 1 and manifests.column_names[:3] == ["shard", "indices", "files"]
    assert manifests.nbytes < table.nbytes / 10
    assert manifests.nbytes / 32 < 2048


def test_too_many_rows_for_a_shard_is_caught(tmp_path):
    out = str(tmp_path / "out")
    loop = CommitLoop(OutputStore(out), 2)
    loop.shard_read("s1", 2)
    loop.add(staged(out, rows("s1", 2)))
    with pytest.raises(RuntimeError, match="counted 2"):
        loop.add(staged(out, rows("s1", 1, start=5)))


def test_incomplete_stream_is_an_error(tmp_path):
    out = str(tmp_path / "out")
    loop = CommitLoop(OutputStore(out), 2)
    loop.add(staged(out, rows("s1", 2)))
    with pytest.raises(RuntimeError, match="incomplete"):
        loop.finish()


def test_replayed_manifests_are_dropped_and_partial_overlaps_rewritten(tmp_path):
    """Retried Ray tasks may deliver a shard's rows again, in other batches: each row is committed once."""
    out = str(tmp_path / "out")
    loop = CommitLoop(OutputStore(out), 1)
    loop.add(staged(out, rows("s1", 3)))             # 0..2
    loop.add(staged(out, rows("s1", 3)))             # the same rows again
    loop.add(staged(out, rows("s1", 4, start=1)))    # 1..4: 1, 2 replayed, 3, 4 new
    loop.shard_read("s1", 5)
    loop.add(staged(out, rows("s1", 5)))             # a full replay after the commit
    loop.finish()
    samples = sorted_df(out, "samples")
    assert samples["index"].tolist() == [0, 1, 2, 3, 4]
    assert len(sorted_df(out, "labels")) == 2 * 4
    assert loop.committed.samples == 5 and loop.committed.labelled == 4
    assert OutputStore(out).repair()["staging_files"] > 0  # the replays' staged files, never committed


CRASH_POINTS = ["labels", "samples", "stats", "version"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_crash_mid_commit_then_repair_gives_exact_rows(tmp_path, crash_at):
    clean = str(tmp_path / "clean")
    lc = CommitLoop(OutputStore(clean), 2)
    for s in ("a", "b", "c", "d"):
        feed(lc, clean, s, 3)
    lc.finish()

    out = str(tmp_path / "out")
    store = OutputStore(out)
    loop = CommitLoop(store, 2)
    feed(loop, out, "a", 3)
    feed(loop, out, "b", 3)  # version 1

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    if crash_at == "version":
        store._append_version = boom
    else:
        store.tables[crash_at].commit = boom
    feed(loop, out, "c", 3)
    with pytest.raises(KeyboardInterrupt):
        feed(loop, out, "d", 3)  # the second group dies mid-commit

    # before any repair, a reader of the latest version sees exactly version 1
    assert sorted(set(sorted_df(out, "samples").shard)) == ["a", "b"]
    fresh = OutputStore(out)
    report = fresh.repair()
    assert fresh.done_shards() == {"a", "b"} and report["uncommitted_files"] > 0
    assert not fresh.fs.exists(f"{fresh.root}/_labelmill/intent.json")
    loop2 = CommitLoop(fresh, 2)
    for s in ("c", "d"):
        feed(loop2, out, s, 3)
    loop2.finish()
    for name in ("samples", "labels"):
        cols = ["key", "shard", "index"]
        assert sorted_df(out, name)[cols].equals(sorted_df(clean, name)[cols]), name
        # Delta and plain Parquet readers see the same rows: nothing half-written is left
        assert len(DeltaTable(f"{out}/{name}").to_pandas()) == len(sorted_df(clean, name))
        assert len(pd.read_parquet(f"{out}/{name}")) == len(sorted_df(clean, name))
    assert [v["version"] for v in labelmill.data.versions(out)] == [1, 2]


def test_pinned_reads_never_change_and_versions_by_time(tmp_path):
    out = str(tmp_path / "out")
    loop = CommitLoop(OutputStore(out), 1)
    feed(loop, out, "a", 3)
    v1 = labelmill.data.open(out)
    before = {t: v1.read(t).to_pylist() for t in ("samples", "labels")}
    files_before = v1.files("samples")
    time.sleep(0.01)
    stamp = labelmill.data.versions(out)[0]["time"]
    feed(loop, out, "b", 4)
    pinned = labelmill.data.open(out, 1)
    assert pinned.files("samples") == files_before
    for t in ("samples", "labels"):
        assert pinned.read(t).to_pylist() == before[t]
        assert labelmill.data.open(out, stamp).read(t).to_pylist() == before[t]
    latest = labelmill.data.open(out)
    assert latest.version == 2 and latest.read("samples").num_rows == 7
    got = sum(b.num_rows for b in latest.iter_batches("samples", columns=["key"], batch_size=2))
    assert got == 7
    assert latest.read("samples", filter=pc.field("shard") == "b").num_rows == 4
    with pytest.raises(labelmill.data.VersionNotFound, match="no version 9"):
        labelmill.data.open(out, 9)
    with pytest.raises(labelmill.data.VersionNotFound):
        labelmill.data.open(out, "1999-01-01T00:00:00")
    with pytest.raises(labelmill.data.OutputNotFound):
        labelmill.data.open(str(tmp_path / "nothing"))
    assert issubclass(labelmill.data.VersionNotFound, LookupError)


def test_remove_shards_and_rollback(tmp_path):
    out = str(tmp_path / "out")
    store = OutputStore(out)
    loop = CommitLoop(store, 1)
    for s in ("a", "b"):
        feed(loop, out, s, 3)
    v2 = sorted_df(out, "samples", 2)
    # replace shard a (new contents, 2 rows) and drop shard b, in one version
    record = store.commit(staged(out, rows("a", 2)).to_pylist(), [{"shard": "a", "fingerprint": {"size": 2}}],
                          remove_shards=["a", "b"])
    assert record["version"] == 3 and record["shards_removed"] == ["a", "b"]
    now = sorted_df(out, "samples")
    assert now.shard.tolist() == ["a", "a"] and len(sorted_df(out, "labels")) == 2
    assert store.committed_shards() == {"a": {"size": 2}}
    assert sorted_df(out, "samples", 2).equals(v2)       # the old version still reads as it was
    back = store.rollback(2)
    assert back["version"] == 4 and back["kind"] == "rollback"
    assert sorted_df(out, "samples").equals(v2)
    assert set(store.done_shards()) == {"a", "b"}
    assert len(DeltaTable(f"{out}/samples").to_pandas()) == len(v2)


def test_output_belongs_to_one_config(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.claim({"a": 1}, "hash1")
    store.claim({"a": 1}, "hash1")
    with pytest.raises(OutputConflictError, match="hash1"):
        store.claim({"a": 2}, "hash2")


def test_every_table_is_declared_once_and_the_store_follows_the_registry(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert list(store.tables) == list(TABLES)
    for spec in TABLES.values():
        if spec.per_sample:
            assert spec.key_columns[:2] == ("shard", "key")


def with_regions(table: pa.Table, dim: int = 8) -> pa.Table:
    """``rows`` with two regions per sample (none on errors)."""
    from labelmill.schemas.records import RegionSet
    from labelmill.schemas.tables import regions_array

    per_row = []
    for i, err in enumerate(table.column(Col.ERROR).to_pylist()):
        if err is not None:
            per_row.append([])
            continue
        emb = np.eye(2, dim, k=i % dim, dtype=np.float16)
        per_row.append([("t", RegionSet(np.array([[0, 0, 5, 5], [1, 1, 20, 10]], np.float32),
                                        np.array([1.0, 0.5], np.float32), ["a", "b"], emb, "crop"))])
    return table.set_column(table.schema.get_field_index(Col.REGIONS), Col.REGIONS, regions_array(per_row))


def test_region_embeddings_are_written_by_workers_and_join_the_version(tmp_path):
    from labelmill.store.regions import RegionReader

    out = str(tmp_path / "out")
    store = OutputStore(out)
    loop = CommitLoop(store, 1)
    loop.add(staged(out, with_regions(rows("s1", 3))))
    assert len(store.fs.ls(store.staging_path("regions"))) == 1      # staged by the worker, not committed
    loop.add(staged(out, with_regions(rows("s2", 2))))
    loop.shard_read("s2", 2)                                          # s2 commits; s1's files stay staged
    assert len(store.fs.ls(store.staging_path("regions"))) == 1
    assert labelmill.data.open(out).record["table_versions"]["regions"] == 0
    reader = RegionReader(out)
    assert reader.keys() == ["k1"]  # k0 of s2 is an error row
    r = reader.get("k1")
    assert r.boxes.tolist() == [[0, 0, 5, 5], [1, 1, 20, 10]] and r.sources == ["a", "b"]
    assert r.boxes_norm == pytest.approx(np.array([[0, 0, 0.25, 0.5], [0.05, 0.1, 1.0, 1.0]]))
    assert r.embeddings.shape == (2, 8) and r.embeddings[0, 1] == 1.0

    # crash now: s1 never completed; a new run's repair drops its staged files
    assert OutputStore(out).repair()["staging_files"] == 3
    loop2 = CommitLoop(OutputStore(out), 1)
    loop2.add(staged(out, with_regions(rows("s1", 5))))
    loop2.shard_read("s1", 5)
    loop2.finish()
    reader = RegionReader(out)
    assert reader.keys() == ["k1", "k2", "k3", "k4"]
    with pytest.raises(KeyError, match="ambiguous"):  # k1 is in both shards
        reader.get("k1")
    assert reader.get("k1", shard="s1").meta["shard"] == "s1"
    assert RegionReader(out, version=1).keys() == ["k1"]   # pinned
    table = pd.read_parquet(f"{out}/regions")
    assert sorted(zip(table.shard, table["index"])) == [("s1", 1), ("s1", 2), ("s1", 3), ("s1", 4), ("s2", 1)]


def test_failed_shard_commits_none_of_its_rows_and_stays_to_do(tmp_path):
    # storage failed mid-shard: the rows read before the failure must not become final
    out = str(tmp_path / "out")
    store = OutputStore(out)
    loop = CommitLoop(store, 1, info={"config_hash": "cfg", "run_id": "run"})
    loop.add(staged(out, rows("s1", 3)))                       # read before the connection dropped
    loop.shard_read("s1", 3, 0, "cannot read shard s1 after 5 attempts: ConnectionResetError")
    loop.add(staged(out, rows("s1", 2, start=3)))              # a late block of the failed shard
    feed(loop, out, "s2", 2)
    committed = loop.finish()
    assert store.done_shards() == {"s2"}                       # the next run reads s1 again
    assert committed.failed_shards == {"s1": "cannot read shard s1 after 5 attempts: ConnectionResetError"}
    assert committed.as_dict()["failed_shards"] == committed.failed_shards
    assert set(sorted_df(out, "samples").shard) == {"s2"} and committed.samples == 2
