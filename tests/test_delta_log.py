"""labelmill writes its Delta tables' log entries itself after creation (``DeltaLog._write_entry``): what it
writes must read exactly in delta-rs and DuckDB at every version, checkpoint at the table's interval,
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
