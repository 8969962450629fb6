"""The commit protocol: atomic groups, crash repair, exactly-once resume (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from labelmill.schemas.records import RowKind
from labelmill.schemas.tables import LABEL_STRUCT, REGION_STRUCT, Col
from labelmill.stages.write import CommitWriter
from labelmill.store.commit import OutputConflictError, OutputStore

PROV = json.dumps({"t": {"teacher": "t", "teacher_type": "maskclip", "weights": "w", "weights_sha256": "abc",
                          "teacher_config_hash": "h"}})


def rows(shard: str, n: int, labels_per_row: int = 2, end: bool = True, start: int = 0) -> pa.Table:
    recs = []
    for i in range(start, start + n):
        labs = [{"teacher": "t", "kind": "box", "class_id": 1, "class_name": "cat", "phrase": None,
                 "tokens_positive": None, "caption": None, "score": 0.9, "bbox": [1, 2, 3, 4], "area": 12.0,
                 "segmentation": None}] * labels_per_row
        recs.append({Col.KEY: f"k{i}", Col.SHARD: shard, Col.INDEX: i, Col.KIND: RowKind.SAMPLE.value,
                     Col.SHARD_ROWS: None, Col.ERROR: "bad" if i == 0 else None, Col.WARNINGS: [],
                     Col.CAPTION: "c", Col.ORIG_H: 10, Col.ORIG_W: 20, Col.META_JSON: None,
                     Col.LABELS: [] if i == 0 else labs, Col.REGIONS: [], Col.PROVENANCE: PROV,
                     Col.DROPPED_LOW_SCORE: 1, Col.DROPPED_SMALL_AREA: 0, Col.DROPPED_OVER_MAX: 0})
    if end:
        recs.append({Col.KEY: "", Col.SHARD: shard, Col.INDEX: start + n, Col.KIND: RowKind.SHARD_END.value,
                     Col.SHARD_ROWS: start + n, Col.ERROR: None, Col.WARNINGS: [], Col.CAPTION: None,
                     Col.ORIG_H: 0, Col.ORIG_W: 0, Col.META_JSON: None, Col.LABELS: [], Col.REGIONS: [],
                     Col.PROVENANCE: PROV, Col.DROPPED_LOW_SCORE: 0, Col.DROPPED_SMALL_AREA: 0,
                     Col.DROPPED_OVER_MAX: 0})
    schema = pa.schema([(Col.KEY, pa.string()), (Col.SHARD, pa.string()), (Col.INDEX, pa.int64()),
                        (Col.KIND, pa.string()), (Col.SHARD_ROWS, pa.int64()), (Col.ERROR, pa.string()),
                        (Col.WARNINGS, pa.list_(pa.string())), (Col.CAPTION, pa.string()),
                        (Col.ORIG_H, pa.int32()), (Col.ORIG_W, pa.int32()), (Col.META_JSON, pa.string()),
                        (Col.LABELS, pa.list_(LABEL_STRUCT)), (Col.REGIONS, pa.list_(REGION_STRUCT)),
                        (Col.PROVENANCE, pa.string()), (Col.DROPPED_LOW_SCORE, pa.int32()),
                        (Col.DROPPED_SMALL_AREA, pa.int32()), (Col.DROPPED_OVER_MAX, pa.int32())])
    return pa.Table.from_pylist(recs, schema=schema)


def writer(store, every=2):
    return CommitWriter(store, every, "cfg", "run", "0.0")


def test_rows_out_of_order_commit_when_shards_complete(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    w = writer(store)
    w.add(rows("s1", 3, end=False))
    w.add(rows("s2", 2))
    assert store.done_shards() == set()          # s1 not complete yet
    w.add(rows("s1", 2, start=3))                # rest of s1 plus its end marker
    assert store.done_shards() == {"s1", "s2"}   # one commit of two shards
    w.add(rows("s3", 1))
    assert store.done_shards() == {"s1", "s2"}
    w.finish()
    assert store.done_shards() == {"s1", "s2", "s3"}
    samples = DeltaTable(str(tmp_path / "out" / "samples")).to_pandas()
    assert len(samples) == 8 and samples.groupby("shard").size().to_dict() == {"s1": 5, "s2": 2, "s3": 1}
    assert set(samples.status) == {"error", "labelled"}
    labels = pd.read_parquet(tmp_path / "out" / "labels")
    assert len(labels) == 2 * 5 and (labels.weights_sha256 == "abc").all()
    stats = DeltaTable(str(tmp_path / "out" / "stats")).to_pandas()
    assert stats.samples.sum() == 8 and stats.dropped_low_score.sum() == 8


def test_too_many_rows_for_a_shard_is_caught(tmp_path):
    w = writer(OutputStore(str(tmp_path / "out")))
    w.add(rows("s1", 2))
    with pytest.raises(RuntimeError, match="announced"):
        w.add(rows("s1", 1, end=False, start=5))


def test_incomplete_stream_is_an_error(tmp_path):
    w = writer(OutputStore(str(tmp_path / "out")))
    w.add(rows("s1", 2, end=False))
    with pytest.raises(RuntimeError, match="incomplete"):
        w.finish()


def _crash_after(store, table_name):
    """Make the commit of ``table_name`` raise after its files were published."""
    table = getattr(store, table_name)
    original = table.commit

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash")

    table.commit = boom
    return original


@pytest.mark.parametrize("crash_at", ["labels", "samples", "stats"])
def test_crash_mid_commit_then_repair_gives_exact_rows(tmp_path, crash_at):
    out = str(tmp_path / "out")
    clean = OutputStore(str(tmp_path / "clean"))
    wc = writer(clean)
    for s in ("a", "b", "c", "d"):
        wc.add(rows(s, 3))
    wc.finish()

    store = OutputStore(out)
    w = writer(store)
    w.add(rows("a", 3))
    w.add(rows("b", 3))        # first group committed
    _crash_after(store, crash_at)
    w.add(rows("c", 3))
    with pytest.raises(KeyboardInterrupt):
        w.add(rows("d", 3))    # second group dies mid-commit

    fresh = OutputStore(out)
    report = fresh.repair()
    done = fresh.done_shards()
    if crash_at == "stats":
        assert done == {"a", "b", "c", "d"}
    else:
        assert done == {"a", "b"} and sum(report.values()) > 0
    w2 = writer(fresh)
    for s in ("a", "b", "c", "d"):
        if s not in done:
            w2.add(rows(s, 3))
    w2.finish()

    def table(root, name):
        return DeltaTable(f"{root}/{name}").to_pandas().sort_values(["shard", "index"]).reset_index(drop=True)

    for name in ("samples", "labels"):
        got, want = table(out, name), table(str(tmp_path / "clean"), name)
        cols = ["key", "shard", "index"]
        assert got[cols].equals(want[cols]), name
    # plain Parquet readers see the same rows: no orphan or staged file is left behind
    assert len(pd.read_parquet(f"{out}/labels")) == len(table(out, "labels"))
    assert len(pd.read_parquet(f"{out}/samples")) == 12


def test_orphans_and_staging_are_removed(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    w = writer(store, every=1)
    w.add(rows("a", 2))
    labels_dir = tmp_path / "out" / "labels"
    (labels_dir / "part-000099-deadbeef.parquet").write_bytes(b"half written")
    (labels_dir / "_staging").mkdir(exist_ok=True)
    (labels_dir / "_staging" / "x.parquet").write_bytes(b"staged")
    report = OutputStore(str(tmp_path / "out")).repair()
    assert report["orphan_files"] == 1 and report["staging_files"] == 1
    assert not (labels_dir / "part-000099-deadbeef.parquet").exists()


def test_output_belongs_to_one_config(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.claim({"a": 1}, "hash1")
    store.claim({"a": 1}, "hash1")
    with pytest.raises(OutputConflictError, match="hash1"):
        store.claim({"a": 2}, "hash2")


def test_replayed_rows_are_dropped(tmp_path):
    """A retried Ray task may deliver a shard's rows again: they must not be written twice."""
    store = OutputStore(str(tmp_path / "out"))
    w = writer(store, every=1)
    w.add(rows("s1", 3, end=False))
    w.add(rows("s1", 3, end=False))        # replay of the same three rows
    w.add(rows("s1", 2, start=3))          # the rest and the end marker
    w.add(rows("s1", 5))                   # a full replay after the commit
    w.finish()
    samples = DeltaTable(str(tmp_path / "out" / "samples")).to_pandas()
    assert sorted(samples["index"]) == [0, 1, 2, 3, 4]
    assert w.committed.samples == 5


def with_regions(table: pa.Table, dim: int = 8) -> pa.Table:
    """``rows`` with two regions per sample row (none on errors and end markers)."""
    from labelmill.schemas.records import RegionSet
    from labelmill.schemas.tables import regions_array

    per_row = []
    for i, (kind, err) in enumerate(zip(table.column(Col.KIND).to_pylist(), table.column(Col.ERROR).to_pylist())):
        if kind != RowKind.SAMPLE.value or err is not None:
            per_row.append([])
            continue
        emb = np.eye(2, dim, k=i % dim, dtype=np.float16)
        per_row.append([("t", RegionSet(np.array([[0, 0, 5, 5], [1, 1, 20, 10]], np.float32),
                                        np.array([1.0, 0.5], np.float32), ["a", "b"], emb, "crop"))])
    return table.set_column(table.schema.get_field_index(Col.REGIONS), Col.REGIONS, regions_array(per_row))


def test_region_embeddings_are_spilled_on_arrival_and_commit_with_their_shard(tmp_path):
    from labelmill.store.regions import RegionReader

    out = str(tmp_path / "out")
    store = OutputStore(out)
    w = writer(store, every=1)
    w.add(with_regions(rows("s1", 3, end=False)))
    # the writer keeps no embeddings in memory: they wait in the regions staging area
    assert all(len(x) == 0 for part in w.buffers["s1"] for x in part.column(Col.REGIONS).to_pylist())
    assert len(store.regions().fs.ls(store.regions().staging)) == 1
    assert not store.regions().exists()
    w.add(with_regions(rows("s2", 2)))  # s2 completes and commits; s1's spill must stay staged
    assert len(store.regions().fs.ls(store.regions().staging)) == 1
    reader = RegionReader(out)
    assert reader.keys() == ["k1"]  # k0 of s2 is an error row
    r = reader.get("k1")
    assert r.boxes.tolist() == [[0, 0, 5, 5], [1, 1, 20, 10]] and r.sources == ["a", "b"]
    assert r.boxes_norm == pytest.approx(np.array([[0, 0, 0.25, 0.5], [0.05, 0.1, 1.0, 1.0]]))
    assert r.embeddings.shape == (2, 8) and r.embeddings[0, 1] == 1.0

    # crash now: s1 never completed.  A new run's repair drops its staged spill.
    report = OutputStore(out).repair()
    assert report["staging_files"] == 1
    assert RegionReader(out).keys() == ["k1"]
    w2 = writer(OutputStore(out), every=1)
    w2.add(with_regions(rows("s1", 5)))
    w2.finish()
    reader = RegionReader(out)
    assert reader.keys() == ["k1", "k2", "k3", "k4"]
    with pytest.raises(KeyError, match="ambiguous"):  # k1 is in both shards
        reader.get("k1")
    assert reader.get("k1", shard="s1").meta["shard"] == "s1"
    table = pd.read_parquet(f"{out}/regions")
    assert sorted(zip(table.shard, table["index"])) == [("s1", 1), ("s1", 2), ("s1", 3), ("s1", 4), ("s2", 1)]
