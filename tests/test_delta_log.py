"""labelmill writes its Delta tables' log entries itself after creation (``DeltaLog._write_entry``): what it
writes must read exactly in delta-rs, polars and DuckDB at every version, checkpoint at the table's interval,
notice entries another process wrote, and never write over an existing entry."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from labelmill.schemas.tables import SAMPLES
from helpers import commit_shard, samples_rows
from labelmill.store.commit import OutputConflictError, OutputStore


def _entry(out: str, table: str, version: int) -> list[dict]:
    with open(os.path.join(out, table, "_delta_log", f"{version:020d}.json")) as fh:
        return [json.loads(line) for line in fh]


def test_own_log_entries_read_exactly_everywhere_and_checkpoint_at_the_interval(tmp_path, monkeypatch):
    import deltalake
    import duckdb
    import polars as pl

    from labelmill.store import commit

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 4)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    expected = {}  # samples' Delta version -> the keys it holds
    live: dict[str, int] = {}
    for v in range(1, 11):
        removed = [f"s{v - 3}"] if v > 3 else []
        rec = commit_shard(store, f"s{v}", v, remove=removed)
        live[f"s{v}"] = v
        for s in removed:
            live.pop(s)
        expected[rec["table_versions"]["samples"]] = sorted(f"{s}-{i}" for s, n in live.items() for i in range(n))
    samples = os.path.join(out, "samples")
    last = max(expected)
    entry = _entry(out, "samples", last)
    assert entry[0]["commitInfo"]["engineInfo"] == "labelmill"  # written by labelmill, not by delta-rs
    assert json.loads(entry[0]["commitInfo"]["labelmill"])["version"] == 10
    assert [a["remove"]["path"] for a in entry if "remove" in a]  # s7's file left in the same entry
    names = os.listdir(os.path.join(samples, "_delta_log"))
    checkpoints = sorted(int(n.split(".")[0]) for n in names if n.endswith(".checkpoint.parquet"))
    assert checkpoints == [v for v in range(1, last + 1) if v % 4 == 0], names
    with open(os.path.join(samples, "_delta_log", "_last_checkpoint")) as fh:
        assert json.load(fh)["version"] == checkpoints[-1]
    for v, keys in expected.items():  # every version, from a fresh reader (checkpoint + entries after it)
        got = deltalake.DeltaTable(samples, version=v).to_pyarrow_table(columns=["key"]).column("key").to_pylist()
        assert sorted(got) == keys, v
    for v, keys in expected.items():  # polars (its own Delta reader over delta-rs's log replay) at every version
        assert sorted(pl.read_delta(samples, version=v, columns=["key"]).get_column("key").to_list()) == keys, v
    files = deltalake.DeltaTable(samples).file_uris()  # DuckDB over the latest version's files
    got = duckdb.connect().execute("select key from read_parquet(?)", [files]).fetchall()
    assert sorted(k for (k,) in got) == expected[last]
    # the stats table (one file per version, never removed) too
    stats = deltalake.DeltaTable(os.path.join(out, "stats")).to_pyarrow_table()
    assert sorted(stats.column("commit").to_pylist()) == list(range(1, 11))


def test_a_writer_notices_entries_another_process_wrote(tmp_path):
    """Two store objects take turns (as two nights in two processes would, one after the other): each
    commit removes exactly the shard it names, whoever committed its file."""
    import labelmill.data

    out = str(tmp_path / "out")
    a = OutputStore(out)
    a.claim({}, "h")
    commit_shard(a, "s1", 2)
    b = OutputStore(out)
    commit_shard(b, "s2", 3, remove=["s1"])  # b sees a's file of s1
    commit_shard(a, "s3", 4, remove=["s2"])  # a sees b's entry: s2's file is not in what a loaded before
    rows = labelmill.data.open(out).read("samples").column("key").to_pylist()
    assert sorted(rows) == [f"s3-{i}" for i in range(4)]
    assert a.tables["samples"].version() == b.tables["samples"].version()
    assert [f["shard"] for f in b.tables["samples"].files_holding(["s3"])] == ["s3"]


def test_an_existing_next_entry_is_never_written_over(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    commit_shard(store, "s1", 2)
    log = store.tables["samples"]
    nxt = os.path.join(out, "samples", "_delta_log", f"{log.version() + 1:020d}.json")
    entry = store._publish(log, store.stage_table("samples", samples_rows("s2", 1)))
    real_link = os.link

    def racing_link(src, dst):  # another writer's entry appears between this object's check and its write
        with open(dst, "w") as fh:
            fh.write(json.dumps({"commitInfo": {"timestamp": 0, "operation": "WRITE"}}) + "\n")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(OutputConflictError, match="appeared during this commit"):
        log.commit([entry], [], {}, SAMPLES)
    with open(nxt) as fh:
        assert "labelmill" not in fh.read()  # the other writer's entry is intact
    assert not [n for n in os.listdir(log.staging) if n.startswith(".log-")]  # no temporary entry left


def test_a_schema_other_than_the_tables_goes_through_delta_rs(tmp_path):
    """A commit whose schema is not the table's needs a metadata action: delta-rs's transaction writes it."""
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    commit_shard(store, "s1", 2)
    log = store.tables["samples"]
    assert log._own_commits(SAMPLES)
    assert not log._own_commits(SAMPLES.append(pa.field("extra", pa.int32())))


def test_vacuum_prunes_the_log_entries_only_vacuumed_versions_read(tmp_path, monkeypatch):
    """``vacuum`` deletes log entries and checkpoints older than the newest checkpoint at or before the oldest
    kept version, in every table and the versions table; every kept version still reads exactly, from a fresh
    process's view."""
    import deltalake

    import labelmill.data
    from labelmill.store import commit
    from labelmill.store.versions import vacuum

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 3)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    for v in range(1, 13):
        commit_shard(store, f"s{v}", v, remove=[f"s{v - 2}"] if v > 2 else [])
    keys = {v: sorted(labelmill.data.open(out, version=v).read("samples").column("key").to_pylist())
            for v in range(1, 13)}
    samples_log = os.path.join(out, "samples", "_delta_log")
    before = set(os.listdir(samples_log))
    oldest_kept = store.versions()[-4]["table_versions"]["samples"]  # keep versions 9..12
    base = max(v for v in range(oldest_kept + 1) if f"{v:020d}.checkpoint.parquet" in before)
    assert base > 0

    dry = vacuum(out, keep_versions=4)
    assert set(os.listdir(samples_log)) == before, "a dry run deletes nothing"
    done = vacuum(out, keep_versions=4, apply=True)
    assert done["log_files"] == dry["log_files"] and done["log_bytes"] > 0
    after = set(os.listdir(samples_log))
    gone = before - after
    assert gone and all(int(n[:20]) < base for n in gone)
    assert {n for n in before if n[:20].isdigit() and int(n[:20]) < base} == gone
    versions_log = os.listdir(os.path.join(out, "_labelmill", "versions", "_delta_log"))
    assert min(int(n[:20]) for n in versions_log if n[:20].isdigit()) > 0  # pruned too
    fresh = OutputStore(out)
    assert [r["version"] for r in fresh.versions()] == list(range(1, 13))  # every record is still there
    for v in range(9, 13):
        assert sorted(labelmill.data.open(out, version=v).read("samples").column("key").to_pylist()) == keys[v]
        tv = fresh.versions()[v - 1]["table_versions"]["samples"]
        got = deltalake.DeltaTable(os.path.join(out, "samples"), version=tv).to_pyarrow_table(columns=["key"])
        assert sorted(got.column("key").to_pylist()) == keys[v]
    commit_shard(fresh, "s13", 1, remove=["s11"])  # the writer goes on after the pruning
    assert sorted(labelmill.data.open(out).read("samples").column("key").to_pylist()) == sorted(
        [k for k in keys[12] if not k.startswith("s11-")] + ["s13-0"])


def test_the_regions_log_prunes_before_its_checkpoint(tmp_path, monkeypatch):
    from labelmill.store import commit

    monkeypatch.setattr(commit, "CHECKPOINT_INTERVAL", 3)
    store = OutputStore(str(tmp_path))
    log = store.tables["regions"]
    for v in range(8):
        log.commit([{"path": f"f{v}.parquet", "size": 1, "rows": 1, "shard": f"s{v}", "stats": "{}"}],
                   [f"f{v - 1}.parquet"] if v else [], {}, None)
    want = {v: log.files(v) for v in range(6, 8)}
    old = [p for p, _ in log.log_files_before(7)]  # newest checkpoint at or before 7: 6
    assert sorted(os.path.basename(p)[:10] for p in old) == sorted(
        [f"v{v:09d}" for v in range(6)] + ["c000000003"])
    assert log.log_files_before(2) == []  # no checkpoint that old
    for p in old:
        os.remove(p)
    fresh = commit.ManifestLog(store.fs, store.root, log.spec)
    assert {v: fresh.files(v) for v in range(6, 8)} == want and fresh.version() == 7


def test_a_filesystem_without_hard_links_still_commits(tmp_path, monkeypatch):
    import labelmill.data

    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.claim({}, "h")
    commit_shard(store, "s1", 2)

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    commit_shard(store, "s2", 3, remove=["s1"])
    assert sorted(labelmill.data.open(out).read("samples").column("key").to_pylist()) == [f"s2-{i}" for i in range(3)]
    assert not [n for n in os.listdir(store.tables["samples"].staging) if n.startswith(".log-")]
