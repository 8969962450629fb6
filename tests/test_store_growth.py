"""The store over many versions: Delta checkpoints at a fixed interval, and pinned versions that stay
readable however old their log entries get (delta-rs would expire them after 30 days at a checkpoint)."""

from __future__ import annotations

import os
import time

from labelmill.schemas.tables import SAMPLES
from helpers import commit_shard, samples_rows
from labelmill.store.commit import OutputStore


def test_every_delta_table_checkpoints_at_the_interval_and_every_version_reads_exactly(tmp_path, monkeypatch):
    import labelmill.data
    from labelmill.store import commit

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 3)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    seen = {}
    for v in range(1, 9):
        rec = commit_shard(store, f"s{v}", v, remove=[f"s{v - 2}"] if v > 2 else [])
        seen[rec["version"]] = sorted(labelmill.data.open(out, version=rec["version"]).read("samples")
                                      .column("key").to_pylist())
    import deltalake

    for table in ("samples", "stats", "_labelmill/versions"):  # labels: created empty, never written
        log = os.listdir(os.path.join(out, table, "_delta_log"))
        assert any(".checkpoint." in n for n in log), (table, sorted(log))
    for table in ("samples", "labels", "stats", "_labelmill/versions"):
        conf = deltalake.DeltaTable(os.path.join(out, table)).metadata().configuration
        assert conf["delta.checkpointInterval"] == "3" and conf["delta.enableExpiredLogCleanup"] == "false"
    for v, keys in seen.items():  # after the checkpoints, each pinned version reads the same rows
        assert sorted(labelmill.data.open(out, version=v).read("samples").column("key").to_pylist()) == keys
    assert len(seen[8]) == 7 + 8 and len(seen[1]) == 1


def test_log_entries_past_the_retention_are_kept(tmp_path, monkeypatch):
    """A table whose log entries are all past delta-rs's retention (here 1 second, as 30 days are in a
    month) still reads its first versions after more checkpoints: labelmill never lets delta-rs expire
    them, also on tables created before it set its table properties."""
    import deltalake

    import labelmill.data
    from labelmill.store import commit

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 2)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    # the samples table as an older labelmill left it: default cleanup, and a retention that has expired
    deltalake.DeltaTable.create(os.path.join(out, "samples"), schema=SAMPLES,
                                configuration={"delta.logRetentionDuration": "interval 1 second",
                                               "delta.checkpointInterval": "2"})
    first = commit_shard(store, "a", 2)["version"]
    time.sleep(1.5)
    for i in range(4):
        commit_shard(store, f"b{i}", 1)
        time.sleep(0.3)
    assert labelmill.data.open(out, version=first).read("samples").num_rows == 2
    assert deltalake.DeltaTable(os.path.join(out, "samples"), version=1).to_pyarrow_table().num_rows == 2


def test_the_regions_log_checkpoints_and_every_version_reads_the_same_files(tmp_path, monkeypatch):
    """The ``_manifest/`` log of the float16 regions table: a checkpoint every CHECKPOINT_INTERVAL versions, and
    reading any version from a checkpoint gives the files the replay of every entry gives."""
    from labelmill.store import commit
    from labelmill.store.commit import ManifestLog
    from labelmill.schemas.tables import TABLES

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 3)
    fs_root = str(tmp_path)
    store = OutputStore(fs_root)
    log = store.tables["regions"]
    assert isinstance(log, ManifestLog)
    live: list[str] = []
    for v in range(10):
        add = [{"path": f"f{v}.parquet", "size": 1, "rows": 1, "shard": f"s{v}", "stats": "{}"}]
        gone = live[:1] if v % 2 else []
        assert log.commit(add, gone, {}, None) == v
        live = [p for p in live if p not in gone] + [add[0]["path"]]
    names = sorted(os.listdir(os.path.join(fs_root, "regions", "_manifest")))
    assert [n for n in names if n.endswith(".checkpoint.json")] == [f"c{v:09d}.checkpoint.json" for v in (3, 6, 9)]
    with_checkpoints = {v: [f["path"] for f in log.files(v)] for v in range(10)}
    assert with_checkpoints[9] == sorted(live)
    for n in names:
        if n.endswith(".checkpoint.json"):
            os.remove(os.path.join(fs_root, "regions", "_manifest", n))
    fresh = ManifestLog(store.fs, store.root, TABLES["regions"])  # nothing cached: a pure replay
    assert {v: [f["path"] for f in fresh.files(v)] for v in range(10)} == with_checkpoints
    assert fresh.drop_after(6) == 3 and fresh.version() == 6


def test_the_writer_state_from_snapshots_equals_the_replay_of_every_record(tmp_path, monkeypatch):
    """A writer reads the latest state snapshot plus the records after it; after every kind of version (run
    commits with classes, replacements, removals, a rollback, an optimize) the state equals the replay of the
    whole history, read by the writer that made it or by a fresh one, with a damaged snapshot or none."""
    from labelmill.store import commit
    from labelmill.store.classes import ClassRegistry
    from labelmill.store.optimize import optimize

    monkeypatch.setattr(commit, "COMPACT_VERSIONS_EVERY", 3)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")

    def check(writer: OutputStore) -> None:
        records = writer.versions()
        for reader in (writer, OutputStore(out)):
            state = reader.state()
            assert state.latest == records[-1]
            assert state.shards == OutputStore.shard_items(records)
            assert state.label_inputs == OutputStore.label_inputs(records)
            assert state.registry().entries == ClassRegistry.from_records(records).entries

    for v in range(1, 8):
        staged = store.stage_table("samples", samples_rows(f"s{v}", 2))
        store.commit([{"files": [staged]}], [{"shard": f"s{v}", "fingerprint": {"size": v}, "inputs": f"k{v % 2}"}],
                     remove_shards=[f"s{v - 3}"] if v > 4 else [],
                     info={"label_inputs": {f"k{v % 2}": {"v": v}}, "vocabularies": {"t": [f"class{v // 2}"]}})
        check(store)
    store.rollback(4)
    check(store)
    optimize(out, group_shards=2)
    check(store)
    snapshots = sorted(os.listdir(os.path.join(out, "_labelmill", "state")))
    assert snapshots == ["000000003.json", "000000006.json", "000000009.json"]
    with open(os.path.join(out, "_labelmill", "state", snapshots[-1]), "w") as fh:
        fh.write('{"latest": ')  # damaged: the one before it is used
    check(OutputStore(out))
    for name in snapshots:
        os.remove(os.path.join(out, "_labelmill", "state", name))
    check(OutputStore(out))  # none: the whole history is replayed
