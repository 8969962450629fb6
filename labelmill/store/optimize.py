"""``labelmill optimize``: the same rows in fewer files, published as one dataset version.

Workers write one file per table and shard, and every night adds a few more, so after a year an output
at the mission's size holds tens of thousands of small files that every full read (an export, a
training epoch, ``diff``) opens one by one.  ``optimize`` packs each table's small files into one file
per *shard group*: up to ``group_shards`` consecutive shards (in shard order) and at most ``target_mb``
per file.  The files are rewritten row for row (each input file's rows in order, the files in shard
order) and committed as one dataset version whose rows are exactly the latest version's: Delta add and
remove actions with ``dataChange: false``, and a version record of ``kind: optimize`` that adds and
removes no shard.  Pinned versions read the files they always read; ``vacuum`` frees the old ones once
no kept version names them.

The price is paid later.  When a night relabels or deletes one shard of a group file, its commit
rewrites the file without that shard (copy on write, ``OutputStore._removals``): a night writes up to
``group_shards`` shards' rows per table for each group it touches.  Larger groups mean fewer files and
dearer nights; BENCHMARKS.md ("A year of nights") measures both.  ``stats`` (one small row per version)
has no shards: its files are packed by size only, rows in commit order.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelmill.store.commit import STAGING, OutputStore, file_stats, shard_range
from labelmill.store.lock import OutputLock
from labelmill.store.read import OutputNotFound, existing_output

from labelmill.store.defaults import GROUP_SHARDS as DEFAULT_GROUP_SHARDS
from labelmill.store.defaults import TARGET_MB as DEFAULT_TARGET_MB


@dataclass
class Group:
    """Files of one table to be rewritten as one."""

    table: str
    files: list[dict] = field(default_factory=list)
    shards: int = 0
    bytes: int = 0

    def describe(self) -> dict:
        first, _ = shard_range(self.files[0].get("stats"))
        _, last = shard_range(self.files[-1].get("stats"))
        return {"table": self.table, "files": len(self.files), "shards": self.shards, "bytes": self.bytes,
                "first_shard": first, "last_shard": last}


def _shards_in(store: OutputStore, table: str, entry: dict) -> int:
    """How many shards a file holds: 1 for a worker's file, read from the shard column for a group file."""
    if entry.get("shard") is not None:
        return 1
    log = store.tables[table]
    with store.fs.open(log.uri_of(entry["path"]), "rb") as fh:
        return int(pc.count_distinct(pq.read_table(fh, columns=["shard"]).column("shard")).as_py())


def plan_groups(store: OutputStore, group_shards: int = DEFAULT_GROUP_SHARDS,
                target_mb: float = DEFAULT_TARGET_MB) -> list[Group]:
    """The groups ``optimize`` would rewrite, over the latest version's files (only groups of 2+ files)."""
    if group_shards < 1:
        raise ValueError("group_shards must be at least 1")
    if target_mb <= 0:
        raise ValueError("target_mb must be positive")
    target = int(target_mb * 2**20)
    groups: list[Group] = []
    for name, log in store.tables.items():
        if not log.exists():
            continue
        per_sample = log.spec.per_sample

        def order(f: dict) -> tuple:
            lo, hi = shard_range(f.get("stats"))
            return lo or "", hi or "", f["path"]

        small = sorted((f for f in log.files() if int(f["size"]) < target), key=order)
        current = Group(name)
        for f in small:
            n = _shards_in(store, name, f) if per_sample else 0
            if current.files and (current.bytes + int(f["size"]) > target
                                  or (per_sample and current.shards + n > group_shards)):
                groups.append(current)
                current = Group(name)
            current.files.append(f)
            current.shards += n
            current.bytes += int(f["size"])
        groups.append(current)
    return [g for g in groups if len(g.files) > 1]


def _merge_stats(parts: list[str]) -> str:
    """One file's Delta stats from the stats of the tables written into it."""
    rows, mins, maxs, nulls = 0, {}, {}, {}
    for text in parts:
        s = json.loads(text)
        rows += s["numRecords"]
        for k, v in s.get("minValues", {}).items():
            mins[k] = v if k not in mins else min(mins[k], v)
        for k, v in s.get("maxValues", {}).items():
            maxs[k] = v if k not in maxs else max(maxs[k], v)
        for k, v in s.get("nullCount", {}).items():
            nulls[k] = nulls.get(k, 0) + v
    return json.dumps({"numRecords": rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types; a column older files lack reads as null."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def write_group(store: OutputStore, group: Group) -> dict:
    """Write a group's rows into one staged file; returns its staging entry (as ``stage_table`` does).

    Per-shard tables are streamed file by file (memory: one input file); ``stats`` is read whole and
    sorted by commit."""
    log = store.tables[group.table]
    paths = [log.uri_of(f["path"]) for f in group.files]

    def read(path: str) -> pa.Table:
        with store.fs.open(path, "rb") as fh:
            return pq.read_table(fh)

    def parts():
        if log.spec.per_sample:
            yield from (read(p) for p in paths)
        else:
            whole = pa.concat_tables([_conform(read(p), schema) for p in paths])
            yield whole.sort_by([(k, "ascending") for k in log.spec.key_columns if k in whole.column_names])

    schemas = []
    for p in paths:
        with store.fs.open(p, "rb") as fh:
            schemas.append(pq.read_schema(fh))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    name = f"part-{uuid.uuid4().hex}.parquet"
    target = posixpath.join(log.staging, name)
    store.fs.makedirs(log.staging, exist_ok=True)
    stats, rows = [], 0
    with store.fs.open(target, "wb") as fh, pq.ParquetWriter(fh, schema, compression=store.compression) as writer:
        for part in parts():
            part = _conform(part, schema)
            stats.append(file_stats(part))
            rows += part.num_rows
            writer.write_table(part, row_group_size=log.spec.row_group_rows)
    return {"table": group.table, "path": f"{STAGING}/{name}", "rows": rows, "bytes": int(store.fs.size(target)),
            "stats": _merge_stats(stats)}


def optimize(output: str, *, group_shards: int = DEFAULT_GROUP_SHARDS, target_mb: float = DEFAULT_TARGET_MB,
             dry_run: bool = False, storage_options: dict | None = None) -> dict:
    """Rewrite the latest version's small files as one file per shard group, as one new dataset version
    (none when there is nothing to pack, or with ``dry_run``).  Takes the output's writer lock."""
    store = existing_output(output, storage_options)
    if store.latest() is None:  # before the lock: nothing is written into a folder that holds no output
        raise OutputNotFound(f"{output} has no committed dataset version to optimize")
    started = time.monotonic()
    with OutputLock(output, storage_options, command="optimize") as lock:
        if not dry_run:
            store.repair()  # an interrupted writer's leftovers first
        before = {name: len(log.files()) for name, log in store.tables.items() if log.exists()}
        groups = plan_groups(store, group_shards, target_mb)
        tables = {}
        for g in groups:
            t = tables.setdefault(g.table, {"files_before": before[g.table], "groups": 0, "files_in": 0,
                                            "bytes_in": 0, "bytes_out": 0})
            t["groups"] += 1
            t["files_in"] += len(g.files)
            t["bytes_in"] += g.bytes
        result = {"output": store.uri, "group_shards": group_shards, "target_mb": target_mb, "dry_run": dry_run,
                  "version": None, "tables": tables, "groups": [g.describe() for g in groups]}
        if dry_run or not groups:
            return result
        staged: dict[str, list[dict]] = {}
        replaced: dict[str, list[str]] = {}
        for g in groups:
            entry = write_group(store, g)
            staged.setdefault(g.table, []).append(entry)
            replaced.setdefault(g.table, []).extend(f["path"] for f in g.files)
            tables[g.table]["bytes_out"] += entry["bytes"]
        lock.ensure_held()
        record = store.rewrite(staged, replaced, {"command": "optimize", "group_shards": group_shards,
                                                  "target_mb": target_mb,
                                                  "optimized": {k: {"files_in": v["files_in"], "groups": v["groups"]}
                                                                for k, v in tables.items()}})
        for name, t in tables.items():
            t["files_after"] = t["files_before"] - t["files_in"] + t["groups"]
        result.update(version=record["version"], seconds=round(time.monotonic() - started, 2))
        return result


def format_optimize(result: dict) -> str:
    lines = []
    for name, t in sorted(result["tables"].items()):
        after = t.get("files_after", t["files_before"] - t["files_in"] + t["groups"])
        lines.append(f"{name:10} {t['files_before']:>7} files -> {after:>7}  ({t['files_in']} packed into "
                     f"{t['groups']} group files, {t['bytes_in'] / 2**20:.1f} MB)")
    if not result["tables"]:
        lines.append("nothing to pack: every table's small files already form full groups")
    elif result["dry_run"]:
        lines.append("dry run: nothing written")
    else:
        lines.append(f"published version {result['version']} (same rows, fewer files) in {result['seconds']} s; "
                     "`labelmill vacuum` frees the old files once no kept version reads them")
    return "\n".join(lines)
