"""The output folder: tables, their logs, dataset versions and the commit protocol.

Workers write Parquet files into each table's ``_staging/`` folder (see
:class:`labelmill.stages.write.WriteTables`) and send the driver small
manifest rows.  The driver commits a group of complete shards as **one
dataset version**:

1. an intent file (``_labelmill/intent.json``) names the version being made
   and every file it adds;
2. per table of the registry (:data:`labelmill.schemas.tables.TABLES`): the
   staged files are moved into the table folder and committed to the
   table's log (Delta Lake, or a ``_manifest/`` log for the float16
   ``regions`` table), together with the removal of replaced shards' files;
3. the ``stats`` row of the group;
4. the **version record**, one row of the ``_labelmill/versions`` Delta
   table: version number, time, each table's log version, shards added
   (with fingerprints) and removed, hashes and counts.  This is the commit
   point: readers (:mod:`labelmill.store.read`) only ever read a table at a
   log version that a record names;
5. the intent file is deleted.

A run killed at any moment leaves either a complete version or an intent
file.  :meth:`OutputStore.repair` then puts every table back to the files
the latest record names, deletes the files the intent added and clears
the staging folders: staged files no record names are never read.
"""

from __future__ import annotations

import bisect
import json
import os
import posixpath
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelmill.schemas.tables import COUNT_COLUMNS, STATS, TABLES, TableSpec, conform
from labelmill.store.classes import ClassRegistry, vocabularies_added
from labelmill.store.refresh_plan import LabelInputs, committed_shard

CONFIG_FILE = "_labelmill/config.json"
INTENT_FILE = "_labelmill/intent.json"
VERSIONS_TABLE = "_labelmill/versions"
VACUUM_FILE = "_labelmill/vacuum.json"  # versions whose files ``labelmill vacuum`` may have deleted
STAGING = "_staging"

VERSIONS_SCHEMA = pa.schema(
    [
        pa.field("version", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("record", pa.string(), nullable=False),
    ]
)


STATE_DIR = "_labelmill/state"  # snapshots of the current shard state, one every COMPACT_VERSIONS_EVERY versions


@dataclass
class StoreState:
    """What a writer needs of the version history, as of its ``latest`` record: the committed shards (shard ->
    item), every label-inputs record a version named, and the class registry's entries.

    A writer keeps this instead of the history (its memory is the live shards', not every night's), and
    reads it from the latest snapshot (``_labelmill/state/``, written every ``COMPACT_VERSIONS_EVERY``
    versions) plus the few records after it."""

    latest: dict | None = None
    shards: dict[str, dict] = field(default_factory=dict)
    label_inputs: dict[str, dict] = field(default_factory=dict)
    classes: list[dict] = field(default_factory=list)
    # the planner's view of ``shards`` (:meth:`committed`), built on first use and kept up to date by apply
    _committed: dict | None = field(default=None, repr=False, compare=False)
    _parsed_inputs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def version(self) -> int:
        return self.latest["version"] if self.latest else 0

    def apply(self, record: dict) -> None:
        """The state after ``record`` (as :meth:`OutputStore.shard_items` replays records)."""
        self.label_inputs.update(record.get("label_inputs") or {})
        for shard in record.get("shards_removed", []):
            self.shards.pop(shard, None)
            if self._committed is not None:
                self._committed.pop(shard, None)
        for item in record.get("shards_added", []):
            self.shards[item["shard"]] = item
            if self._committed is not None:
                self._committed[item["shard"]] = committed_shard(item, self._inputs())
        self.classes.extend(record.get("classes_added") or [])
        self.latest = record

    def _inputs(self) -> dict:
        for key, value in self.label_inputs.items():
            if key not in self._parsed_inputs:
                self._parsed_inputs[key] = LabelInputs.from_dict(value)
        return self._parsed_inputs

    def committed(self) -> dict:
        """shard -> :class:`~labelmill.store.refresh_plan.CommittedShard`, what ``plan_refresh`` compares
        tonight's listing with (as ``committed_from_records`` builds it).  Built once, then changed record by
        record: a writer that plans night after night does not convert every shard again.  Read-only."""
        if self._committed is None:
            inputs = self._inputs()
            self._committed = {shard: committed_shard(item, inputs) for shard, item in self.shards.items()}
        return self._committed

    def registry(self) -> ClassRegistry:
        return ClassRegistry.from_records([{"classes_added": self.classes}])

    def to_json(self) -> str:
        return json.dumps({"latest": self.latest, "shards": self.shards, "label_inputs": self.label_inputs,
                           "classes": self.classes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StoreState":
        d = json.loads(text)
        return cls(d["latest"], d["shards"], d["label_inputs"], d["classes"])


class OutputConflictError(RuntimeError):
    """The output folder belongs to a different configuration."""


#: every Delta table of an output (the data tables and ``_labelmill/versions``) writes a checkpoint every this
#: many commits, so opening any version replays at most this many JSON log entries after a checkpoint
CHECKPOINT_INTERVAL = 20
#: the version records (one small Parquet file per version) are compacted into one file every this many versions,
#: so reading every record stays a few files however long the history (bench_year.py)
COMPACT_VERSIONS_EVERY = 20
#: table properties of every Delta table labelmill creates: the checkpoint interval, and no expiry of log entries.
#: delta-rs deletes log entries older than ``delta.logRetentionDuration`` (30 days) when it writes a checkpoint,
#: which would make every version older than a month unreadable; pinned versions must stay readable until
#: ``labelmill vacuum`` says otherwise (the version record's ``table_versions`` name Delta versions)
def delta_table_config() -> dict[str, str]:
    return {"delta.checkpointInterval": str(CHECKPOINT_INTERVAL), "delta.enableExpiredLogCleanup": "false"}


def post_commit():
    """Checkpoints at the interval, and never a log cleanup (also on tables created before these properties)."""
    from deltalake import PostCommitHookProperties

    return PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def bring_up_to_date(table, uri: str) -> None:
    """Update a kept-open Delta table to the latest version of its log.

    delta-rs lists the log folder from the table's version on.  On S3 that is one LIST request whatever the
    history (start-after); on local disk it reads every entry's name, a cost that grows with the history
    (1.3 ms at 200 entries, and a commit asked a dozen times).  Locally, one stat of the next entry's name
    says whether anything moved (a Delta commit appears whole, by rename)."""
    if not uri.startswith(("s3://", "s3a://")):
        nxt = os.path.join(uri, "_delta_log", f"{table.version() + 1:020d}.json")
        if not os.path.exists(nxt):
            return
    table.update_incremental()


def delta_log_files_before(fs, table_path: str, version: int) -> list[tuple[str, int]]:
    """(path, bytes) of a Delta log's files that no version at or after ``version`` needs: the entries and
    checkpoints older than the newest checkpoint at or before ``version`` (a reader of any later version
    starts from that checkpoint or a newer one).  Nothing when no checkpoint is that old."""
    folder = posixpath.join(table_path, "_delta_log")
    if not fs.exists(folder):
        return []
    found: list[tuple[int, str, str, int]] = []
    for info in fs.ls(folder, detail=True):
        name = posixpath.basename(info["name"])
        head, _, rest = name.partition(".")
        if len(head) == 20 and head.isdigit() and rest.split(".")[0] in ("json", "checkpoint", "crc"):
            found.append((int(head), rest, info["name"], int(info.get("size") or 0)))
    base = max((v for v, rest, _, _ in found if rest.startswith("checkpoint") and v <= version), default=None)
    if base is None:
        return []
    return sorted((path, size) for v, _, path, size in found if v < base)


def delta_storage_options(fsspec_options: dict[str, Any], uri: str) -> dict[str, str] | None:
    """Translate s3fs-style options into delta-rs (object_store) options."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    out = {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}  # labelmill has a single writer per output
    endpoint = fsspec_options.get("endpoint_url") or fsspec_options.get("client_kwargs", {}).get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    if fsspec_options.get("key"):
        out["AWS_ACCESS_KEY_ID"] = fsspec_options["key"]
    if fsspec_options.get("secret"):
        out["AWS_SECRET_ACCESS_KEY"] = fsspec_options["secret"]
    if fsspec_options.get("token"):
        out["AWS_SESSION_TOKEN"] = fsspec_options["token"]
    region = fsspec_options.get("client_kwargs", {}).get("region_name")
    if region:
        out["AWS_REGION"] = region
    return out


#: columns whose min/max go into a file's Delta stats (small, and what readers prune on)
STATS_COLUMNS = ("shard", "key", "index", "commit")


def file_stats(table: pa.Table) -> str:
    """Delta ``stats`` JSON: row count plus min/max/nulls of the identifying columns."""
    mins, maxs, nulls = {}, {}, {}
    for f in table.schema:
        if f.name not in STATS_COLUMNS:
            continue
        col = table.column(f.name)
        nulls[f.name] = col.null_count
        if table.num_rows and col.null_count < table.num_rows:
            mm = pc.min_max(col)
            mins[f.name], maxs[f.name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def stats_shard(stats: str) -> str | None:
    """The shard of a file written for one shard (its min and max agree), from its stats JSON."""
    lo, hi = shard_range(stats)
    return lo if lo is not None and lo == hi else None


def shard_range(stats: str | None) -> tuple[str | None, str | None]:
    """The first and last shard whose rows a file holds, from its stats JSON ((None, None): no shard column).
    A file of one shard has first == last; ``labelmill optimize`` writes files that hold several."""
    s = json.loads(stats or "{}")
    return s.get("minValues", {}).get("shard"), s.get("maxValues", {}).get("shard")


def holds_any(entry: dict, ordered: list[str]) -> bool:
    """Whether a file entry's shard range can hold any shard of the sorted list ``ordered``."""
    lo, hi = shard_range(entry.get("stats"))
    if lo is None or hi is None:
        return False
    i = bisect.bisect_left(ordered, lo)
    return i < len(ordered) and ordered[i] <= hi


def write_parquet(fs, path: str, table: pa.Table, compression: str | None, row_group_rows: int) -> int:
    """Write one Parquet file; returns its size in bytes."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh, compression=compression, row_group_size=row_group_rows)
    return int(fs.size(path))


# --------------------------------------------------------------------------
# Table logs
# --------------------------------------------------------------------------


class TableLog(ABC):
    """The committed history of one table: which files each log version holds.

    A file entry is ``{"path", "size", "rows", "shard", "stats"}`` with
    ``path`` relative to the table folder.
    """

    def __init__(self, fs, root: str, spec: TableSpec):
        self.fs = fs
        self.spec = spec
        self.name = spec.name
        self.path = posixpath.join(root, spec.name)

    @property
    def staging(self) -> str:
        return posixpath.join(self.path, STAGING)

    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def version(self) -> int | None:
        """The latest log version, None if the table has no log yet."""

    @abstractmethod
    def files(self, version: int | None = None) -> list[dict]:
        """File entries of ``version`` (default: latest); [] before the first commit."""

    def files_holding(self, ordered: list[str]) -> list[dict]:
        """The latest version's file entries whose shard range can hold a shard of the sorted list ``ordered``."""
        return [f for f in self.files() if holds_any(f, ordered)]

    @abstractmethod
    def commit(self, add: list[dict], remove: list[str], info: dict[str, Any], schema: pa.Schema | None,
               data_change: bool = True) -> int:
        """Commit adds and removes as one log version; returns it.  ``data_change=False``: the same rows in
        other files (``labelmill optimize``), which Delta readers of the changes may skip."""

    def log_files_before(self, version: int) -> list[tuple[str, int]]:
        """(path, bytes) of log files no reader of ``version`` or later needs (``labelmill vacuum``)."""
        return []

    def uri_of(self, path: str) -> str:
        return posixpath.join(self.path, path)

    def clear_staging(self) -> int:
        if not self.fs.exists(self.staging):
            return 0
        n = len(self.fs.find(self.staging))
        self.fs.rm(self.staging, recursive=True)
        return n


class DeltaLog(TableLog):
    """A Delta Lake table whose data files labelmill writes and commits itself.

    Reads (any version) go through delta-rs.  Commits after the table's creation are written here, as the
    protocol's JSON log entry (commitInfo, add and remove actions), and delta-rs writes a checkpoint at the
    table's ``delta.checkpointInterval`` (``CHECKPOINT_INTERVAL`` on the tables labelmill creates).  delta-rs's own transaction rebuilt the table's whole state around
    every commit (before and after it: about 10 ms per 2,700 live files, growing with the table), which made
    a night's commit grow with the output (bench_year.py); a log entry costs the same at any size.  The
    single writer the output lock guarantees makes the plain write safe; a next entry that already exists
    is refused all the same.  Tables whose protocol asks more than add/remove (writer version > 2) or a
    schema other than the table's fall back to delta-rs's transaction.

    The live files a commit must know (which files hold the shards it removes) come from the add actions
    as last loaded by delta-rs plus what this object committed since, so a night costs no state reload.
    """

    def __init__(self, fs, root: str, spec: TableSpec, delta_root: str, storage):
        super().__init__(fs, root, spec)
        self.uri = delta_root.rstrip("/") + "/" + spec.name
        self.storage = storage
        self.local = not self.uri.startswith(("s3://", "s3a://"))
        self._latest = None  # delta-rs's table at the latest version it read, brought up to date on demand
        self._head: int | None = None  # the newest log version this object knows of
        # the live files: add actions as delta-rs last loaded them (Arrow), then this object's own commits
        self._base: pa.Table | None = None
        self._own_head: int | None = None  # the version ``_base`` plus this object's own commits describe
        self._added: dict[str, dict] = {}
        self._removed: set[str] = set()
        self._own_ok: bool | None = None  # whether this table's protocol lets labelmill write its entries
        self._schema_json: str | None = None
        self._interval = CHECKPOINT_INTERVAL

    def _entry_path(self, version: int) -> str:
        return posixpath.join(self.path, "_delta_log", f"{version:020d}.json")

    def _entry_exists(self, version: int) -> bool:
        path = self._entry_path(version)
        if self.local:
            return os.path.exists(path)
        self.fs.invalidate_cache(posixpath.dirname(path))  # s3fs may answer from a listing it cached
        return self.fs.exists(path)

    def _table(self, version: int | None = None):
        """delta-rs's table at ``version`` (None: the latest).  The latest is opened once and then updated
        with the log entries added since."""
        from deltalake import DeltaTable

        if version is not None:
            return DeltaTable(self.uri, version=version, storage_options=self.storage)
        if self._latest is None:
            self._latest = DeltaTable(self.uri, storage_options=self.storage)
        else:
            bring_up_to_date(self._latest, self.uri)
        return self._latest

    def exists(self) -> bool:
        from deltalake import DeltaTable

        return (self._head is not None or self._latest is not None
                or DeltaTable.is_deltatable(self.uri, storage_options=self.storage))

    def version(self) -> int | None:
        """The newest log version: the one this object knows, after checking that no later entry appeared
        (one stat locally, one HEAD on S3; delta-rs's update lists the log and reloads the table)."""
        if self._head is None:
            if not self.exists():
                return None
            self._head = self._table().version()
        while self._entry_exists(self._head + 1):
            self._head += 1
        return self._head

    def files(self, version: int | None = None) -> list[dict]:
        if not self.exists():
            return []
        return self._entries(pa.table(self._table(version).get_add_actions(flatten=True)))

    def log_files_before(self, version: int) -> list[tuple[str, int]]:
        return delta_log_files_before(self.fs, self.path, version)

    def _live(self) -> pa.Table:
        """The add actions as last loaded, reloaded when someone else moved the log since."""
        if self._base is None or self.version() != self._own_head:
            table = self._table()
            self._base = pa.table(table.get_add_actions(flatten=True))
            self._own_head = table.version()
            self._added, self._removed = {}, set()
        return self._base

    def files_holding(self, ordered: list[str]) -> list[dict]:
        """As the base class, but the add actions are filtered in Arrow first: a commit that replaces a few
        shards builds entries for their files only, not for every live file (45 µs each)."""
        if not self.exists() or not ordered:
            return []
        actions = self._live()
        picked: list[dict] = []
        if "min.shard" in actions.column_names:
            lo, hi = actions.column("min.shard"), actions.column("max.shard")
            one = pc.and_(pc.equal(lo, hi), pc.is_in(lo, value_set=pa.array(ordered, pa.string())))
            spans = pc.and_(pc.not_equal(lo, hi),
                            pc.and_(pc.less_equal(lo, ordered[-1]), pc.greater_equal(hi, ordered[0])))
            picked = [f for f in self._entries(actions.filter(pc.fill_null(pc.or_(one, spans), False)))
                      if f["path"] not in self._removed and f["path"] not in self._added]
        picked += self._added.values()
        return sorted((f for f in picked if holds_any(f, ordered)), key=lambda f: f["path"])

    @staticmethod
    def _entries(actions: pa.Table) -> list[dict]:
        cols = actions.column_names
        out = []
        for row in actions.to_pylist():
            lo, hi = row.get("min.shard"), row.get("max.shard")
            stats = {"numRecords": row["num_records"]}
            if "min.shard" in cols:
                stats.update(minValues={"shard": lo}, maxValues={"shard": hi})
            out.append({"path": row["path"], "size": row["size_bytes"], "rows": row["num_records"],
                        "shard": lo if lo == hi else None, "stats": json.dumps(stats)})
        return sorted(out, key=lambda f: f["path"])

    def _own_commits(self, schema: pa.Schema) -> bool:
        """Whether this commit may be written as a plain log entry: the protocol needs no more than add and
        remove actions, and the schema is the table's (no metadata action)."""
        from deltalake import Schema

        if self._own_ok is None:
            table = self._table()
            proto = table.protocol()
            self._own_ok = proto.min_writer_version <= 2 and proto.min_reader_version <= 1
            self._schema_json = table.schema().to_json()
            # the table's own interval (tables created before labelmill set it: labelmill's)
            self._interval = int(table.metadata().configuration.get("delta.checkpointInterval",
                                                                    CHECKPOINT_INTERVAL))
        return self._own_ok and Schema.from_arrow(schema).to_json() == self._schema_json

    def commit(self, add: list[dict], remove: list[str], info: dict[str, Any], schema: pa.Schema | None,
               data_change: bool = True) -> int:
        from deltalake import CommitProperties, DeltaTable
        from deltalake.transaction import AddAction, RemoveAction

        schema = schema if schema is not None else self.spec.schema
        now = int(time.time() * 1000)
        if not self.exists():
            self._latest = self._head = self._base = self._own_ok = None
            DeltaTable.create(self.uri, schema=schema, storage_options=self.storage, configuration=delta_table_config())
            if not add and not remove:  # the first commit of a table with no rows yet: it exists, empty
                return self.version()
        if self._own_commits(schema):
            return self._write_entry(add, remove, info, data_change, now)
        actions: list[Any] = [
            AddAction(path=f["path"], size=int(f["size"]), partition_values={}, modification_time=now,
                      data_change=data_change, stats=f["stats"])
            for f in add
        ]
        actions += [RemoveAction(path=p, data_change=data_change, deletion_timestamp=now) for p in remove]
        props = CommitProperties(custom_metadata={"labelmill": json.dumps(info, sort_keys=True)})
        self._table().create_write_transaction(actions, mode="append", schema=schema, commit_properties=props,
                                               post_commithook_properties=post_commit())
        self._base = None  # reloaded from delta-rs when next needed
        return self.version()

    def _write_entry(self, add: list[dict], remove: list[str], info: dict[str, Any], data_change: bool,
                     now: int) -> int:
        """Write the next log version (commitInfo, adds, removes) whole, and a checkpoint at the interval."""
        self._live()  # the live files as of the version before this one
        version = self._own_head + 1  # _live() just checked that no later entry exists (one stat or HEAD)
        lines = [{"commitInfo": {"timestamp": now, "operation": "WRITE" if data_change else "OPTIMIZE",
                                 "operationParameters": {"mode": "Append", "partitionBy": "[]"},
                                 "engineInfo": "labelmill", "clientVersion": "labelmill",
                                 "labelmill": json.dumps(info, sort_keys=True)}}]
        lines += [{"add": {"path": f["path"], "partitionValues": {}, "size": int(f["size"]),
                           "modificationTime": now, "dataChange": data_change, "stats": f["stats"]}} for f in add]
        lines += [{"remove": {"path": p, "dataChange": data_change, "deletionTimestamp": now,
                              "extendedFileMetadata": False}} for p in remove]
        body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
        target = self._entry_path(version)
        if self.local:  # written aside, then linked into place: appears whole, and never over another entry
            tmp = posixpath.join(self.staging, f".log-{uuid.uuid4().hex}.json")
            os.makedirs(self.staging, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(body)
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise OutputConflictError(f"{self.uri}: log version {version} appeared during this commit; "
                                          "another process wrote to the table") from None
            except OSError:  # a filesystem without hard links: check, then rename (the lock keeps one writer)
                if os.path.exists(target):
                    raise OutputConflictError(f"{self.uri}: log version {version} already exists") from None
                os.rename(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:  # one PUT appears whole; the output lock makes this the only writer
            if self._entry_exists(version):
                raise OutputConflictError(f"{self.uri}: log version {version} already exists")
            self.fs.pipe_file(target, body)
        self._head = self._own_head = version
        for p in remove:
            self._removed.add(p)
            self._added.pop(p, None)
        for f in add:
            self._added[f["path"]] = {"path": f["path"], "size": int(f["size"]), "rows": int(f["rows"]),
                                      "shard": stats_shard(f["stats"]), "stats": f["stats"]}
            self._removed.discard(f["path"])
        if version % self._interval == 0:
            self._table().create_checkpoint()  # delta-rs reads the table up to this version and writes it
        return version


class ManifestLog(TableLog):
    """Plain Parquet files plus a JSON log entry per commit in ``_manifest/``.

    For tables with types Delta Lake cannot express (float16 vectors).  Each
    entry (``v{version:09d}-{id}.json``) records its own ``version`` and its
    adds and removes; a version's files are the replay of the entries up to
    it.  Every ``CHECKPOINT_INTERVAL`` versions a checkpoint
    (``c{version:09d}.checkpoint.json``) holds the whole file list, so a
    version is read from one listing, one checkpoint and at most that many
    entries, however long the history.  Plain Parquet readers skip
    ``_manifest/`` and ``_staging/``.
    """

    @property
    def log_dir(self) -> str:
        return posixpath.join(self.path, "_manifest")

    def exists(self) -> bool:
        return self.fs.exists(self.log_dir)

    def _listing(self) -> tuple[dict[int, str], dict[int, str]]:
        """(version -> entry path, version -> checkpoint path), from one listing; no file is read."""
        entries, checkpoints = {}, {}
        if not self.exists():
            return entries, checkpoints
        for path in self.fs.ls(self.log_dir, detail=False):
            name = posixpath.basename(path)
            if name.startswith("v") and name.endswith(".json"):
                entries[int(name[1:10])] = path
            elif name.startswith("c") and name.endswith(".checkpoint.json"):
                checkpoints[int(name[1:10])] = path
        return entries, checkpoints

    def _read(self, path: str) -> dict:
        """A log file, parsed once per object (entries and checkpoints never change once written)."""
        seen = self.__dict__.setdefault("_parsed", {})
        if path not in seen:
            with self.fs.open(path, "r") as fh:
                seen[path] = json.load(fh)
        return seen[path]

    def version(self) -> int | None:
        entries, _ = self._listing()
        return max(entries) if entries else None

    def files(self, version: int | None = None) -> list[dict]:
        entries, checkpoints = self._listing()
        if not entries:
            return []
        version = max(entries) if version is None else version
        base = max((c for c in checkpoints if c <= version), default=None)
        files: dict[str, dict] = {}
        if base is not None:
            files = {f["path"]: f for f in self._read(checkpoints[base])["files"]}
        for v in sorted(v for v in entries if (base is None or v > base) and v <= version):
            entry = self._read(entries[v])
            for f in entry.get("add", []):
                files[f["path"]] = f
            for p in entry.get("remove", []):
                files.pop(p, None)
        return [files[p] for p in sorted(files)]

    def _put(self, name: str, body: str) -> None:
        # a single PUT (S3) or a rename of a finished file (local): the file appears whole
        tmp = posixpath.join(self.staging, f"log-{uuid.uuid4().hex}.json")
        self.fs.makedirs(self.staging, exist_ok=True)
        self.fs.makedirs(self.log_dir, exist_ok=True)
        with self.fs.open(tmp, "w") as fh:
            fh.write(body)
        self.fs.mv(tmp, posixpath.join(self.log_dir, name))

    def commit(self, add: list[dict], remove: list[str], info: dict[str, Any], schema: pa.Schema | None,
               data_change: bool = True) -> int:
        current = self.version()
        version = 0 if current is None else current + 1
        body = json.dumps({"version": version, "add": add, "remove": list(remove), "info": info,
                           "data_change": data_change}, sort_keys=True)
        self._put(f"v{version:09d}-{uuid.uuid4().hex[:8]}.json", body)
        if version and version % CHECKPOINT_INTERVAL == 0:  # after the entry: a crash between leaves none
            self._put(f"c{version:09d}.checkpoint.json",
                      json.dumps({"version": version, "files": self.files(version)}, sort_keys=True))
        return version

    def log_files_before(self, version: int) -> list[tuple[str, int]]:
        entries, checkpoints = self._listing()
        base = max((c for c in checkpoints if c <= version), default=None)
        if base is None:
            return []
        old = [p for v, p in [*entries.items(), *checkpoints.items()] if v < base]
        return sorted((p, int(self.fs.size(p))) for p in old)

    def drop_after(self, version: int | None) -> int:
        """Delete log entries (and checkpoints) newer than ``version`` (repair of a version never recorded)."""
        entries, checkpoints = self._listing()
        doomed = [p for v, p in [*entries.items(), *checkpoints.items()] if version is None or v > version]
        for path in doomed:
            self.fs.rm(path)
        return sum(1 for v in entries if version is None or v > version)


# --------------------------------------------------------------------------
# The output store
# --------------------------------------------------------------------------


class OutputStore:
    """All tables of one output folder, its dataset versions and its commits."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None, compression: str = "zstd"):
        self.uri = path.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.delta_root = self.uri if self.uri.startswith(("s3://", "s3a://")) else self.root
        self.delta_storage = delta_storage_options(self.storage_options, self.uri)
        self.compression = None if compression == "none" else compression
        self.tables: dict[str, TableLog] = {}
        self._state: tuple[int, StoreState] | None = None  # (versions-table version, the state as of it)
        self._versions_delta = None  # the versions table, opened once and brought up to date incrementally
        for spec in TABLES.values():
            if spec.format == "delta":
                self.tables[spec.name] = DeltaLog(self.fs, self.root, spec, self.delta_root, self.delta_storage)
            else:
                self.tables[spec.name] = ManifestLog(self.fs, self.root, spec)

    def table(self, name: str) -> TableLog:
        return self.tables[name]

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    # ------------------------------------------------------------- config
    def read_config(self) -> dict | None:
        path = self._path(CONFIG_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as fh:
            return json.load(fh)

    def check_writable(self) -> None:
        """Refuse an output path that is a file, or lies under one (object stores have no such files)."""
        path = self.root
        while path and path not in ("/", "."):
            try:
                info = self.fs.info(path)
            except (FileNotFoundError, NotADirectoryError):
                path = posixpath.dirname(path.rstrip("/"))
                continue
            except Exception as exc:  # noqa: BLE001 - storage errors (credentials, network) are one line
                from labelmill.io.shards import is_transient, storage_message

                if not is_transient(exc):
                    raise
                raise OutputConflictError(f"cannot reach output {self.uri}: "
                                          f"{storage_message(exc, 'output.storage_options')}") from None
            if info.get("type") == "file":
                what = "is a file" if path == self.root else f"lies under the file {path}"
                raise OutputConflictError(f"output {self.uri} {what}; give a folder for output.path")
            return

    def claim(self, config: dict, config_hash: str, *, replace: bool = False) -> None:
        """Record the owning config, or refuse if another config owns the output.

        ``replace=True`` (a refresh that re-labelled every stale shard) makes
        ``config`` the owner whatever owned the output before.
        """
        existing = self.read_config()
        if existing is not None and not replace:
            if existing.get("config_hash") != config_hash:
                raise OutputConflictError(
                    f"output {self.uri} holds labels of config {existing.get('config_hash')}, but this run's "
                    f"config hashes to {config_hash}: labels would mix. Use a new output.path, or delete the "
                    "folder to start over."
                )
            return
        if existing is None and self.tables["samples"].exists():
            raise OutputConflictError(f"output {self.uri} has a samples table but no {CONFIG_FILE}; refusing")
        path = self._path(CONFIG_FILE)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "w") as fh:
            json.dump({"config_hash": config_hash, "config": config}, fh, indent=2, sort_keys=True)

    # ------------------------------------------------------------ versions
    def _versions_uri(self) -> str:
        return self.delta_root.rstrip("/") + "/" + VERSIONS_TABLE

    def versions_log_files_before_latest(self) -> list[tuple[str, int]]:
        """The versions table is only ever read at its latest version: its log before the latest
        checkpoint is not needed (``labelmill vacuum``)."""
        table = self._versions_table()
        if table is None:
            return []
        return delta_log_files_before(self.fs, self._path(VERSIONS_TABLE), table.version())

    def versions(self) -> list[dict]:
        """Every version record, oldest first (the history: ``versions``, ``diff``, ``rollback``, readers that pick
        a version).  Parsed on each call and not kept: a writer works from :meth:`state`."""
        from deltalake import DeltaTable

        uri = self._versions_uri()
        if not DeltaTable.is_deltatable(uri, storage_options=self.delta_storage):
            return []
        rows = DeltaTable(uri, storage_options=self.delta_storage).to_pyarrow_table(columns=["record"])
        return sorted((json.loads(r) for r in rows.column("record").to_pylist()), key=lambda r: r["version"])

    def _records_after(self, table, version: int) -> list[dict]:
        """The records newer than ``version``: the versions table's files are pruned on their version stats, so
        this reads the last compacted file or two, not the history."""
        rows = table.to_pyarrow_table(columns=["record"], filters=[("version", ">", version)])
        return sorted((json.loads(r) for r in rows.column("record").to_pylist()), key=lambda r: r["version"])

    def _snapshots(self) -> dict[int, str]:
        folder = self._path(STATE_DIR)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.ls(folder, detail=False):
            name = posixpath.basename(path)
            if name.endswith(".json") and name[:-5].isdigit():
                out[int(name[:-5])] = path
        return out

    def _versions_table(self):
        """The versions table at its latest version (None before the first record).  Opened once, then
        updated with the entries added since: a fresh open reads the checkpoint and up to 19 log entries,
        and a commit asks several times (on S3, each entry is a GET)."""
        from deltalake import DeltaTable

        if self._versions_delta is None:
            uri = self._versions_uri()
            if not DeltaTable.is_deltatable(uri, storage_options=self.delta_storage):
                return None
            self._versions_delta = DeltaTable(uri, storage_options=self.delta_storage)
        else:
            bring_up_to_date(self._versions_delta, self._versions_uri())
        return self._versions_delta

    def state(self) -> StoreState:
        """The writer's view of the history, as of the latest version (see :class:`StoreState`): the latest
        snapshot plus the records after it, or this object's own state brought up to date."""
        table = self._versions_table()
        if table is None:
            return StoreState()
        if self._state is not None and self._state[0] == table.version():
            return self._state[1]
        state = self._state[1] if self._state is not None else None
        if state is None:
            snapshots = self._snapshots()
            state = StoreState()
            for v in sorted(snapshots, reverse=True):  # the newest readable snapshot (one is written whole)
                try:
                    with self.fs.open(snapshots[v], "r") as fh:
                        state = StoreState.from_json(fh.read())
                    break
                except (ValueError, KeyError, OSError):
                    continue
        for record in self._records_after(table, state.version):
            state.apply(record)
        self._state = (table.version(), state)
        return state

    def _write_snapshot(self, state: StoreState) -> None:
        path = self._path(f"{STATE_DIR}/{state.version:09d}.json")
        tmp = self._path(f"{STATE_DIR}/.{uuid.uuid4().hex}.tmp")
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(tmp, "w") as fh:
            fh.write(state.to_json())
        self.fs.mv(tmp, path)  # appears whole: a rename locally, one PUT on S3

    def vacuumed(self) -> set[int]:
        """Versions whose files ``vacuum`` may have deleted (they can no longer be read)."""
        path = self._path(VACUUM_FILE)
        if not self.fs.exists(path):
            return set()
        with self.fs.open(path, "r") as fh:
            return set(json.load(fh).get("vacuumed", []))

    def latest(self) -> dict | None:
        return self.state().latest

    def _append_version(self, record: dict) -> None:
        from deltalake import write_deltalake

        row = pa.table(
            {"version": [record["version"]],
             "time": pa.array([datetime.fromisoformat(record["time"])], pa.timestamp("us", tz="UTC")),
             "record": [json.dumps(record, sort_keys=True)]},
            schema=VERSIONS_SCHEMA,
        )
        state = self.state()  # as of the version before this one
        table = self._versions_table()
        if table is None:
            write_deltalake(self._versions_uri(), row, mode="append", storage_options=self.delta_storage,
                            configuration=delta_table_config(), post_commithook_properties=post_commit())
        else:  # the open table (a URI would be opened afresh: its checkpoint and log entries read again)
            write_deltalake(table, row, mode="append", post_commithook_properties=post_commit())
        table = self._versions_table()
        if record["version"] % COMPACT_VERSIONS_EVERY == 0:  # same rows in fewer files (a dataChange=false commit)
            table.optimize.compact(post_commithook_properties=post_commit())
            table = self._versions_table()
        if state.version == record["version"] - 1:
            state.apply(record)
            self._state = (table.version(), state)
        else:
            self._state = None
            state = self.state()
        if record["version"] % COMPACT_VERSIONS_EVERY == 0:
            self._write_snapshot(state)

    @staticmethod
    def shard_items(records: Iterable[dict]) -> dict[str, dict]:
        """shard -> its item (``{"shard", "fingerprint", "inputs", ...}``) as a sequence of records leaves it."""
        state: dict[str, dict] = {}
        for rec in records:
            for s in rec.get("shards_removed", []):
                state.pop(s, None)
            for item in rec.get("shards_added", []):
                state[item["shard"]] = item
        return state

    @staticmethod
    def label_inputs(records: Iterable[dict]) -> dict[str, dict]:
        """Every label-inputs record any version names (key -> inputs, see ``shard_items``' ``inputs``)."""
        out: dict[str, dict] = {}
        for rec in records:
            out.update(rec.get("label_inputs") or {})
        return out

    def committed_shards(self) -> dict[str, dict]:
        """shard -> fingerprint, as of the latest version."""
        return {s: item.get("fingerprint", {}) for s, item in self.state().shards.items()}

    def done_shards(self) -> set[str]:
        return set(self.state().shards)

    # -------------------------------------------------------------- commit
    def staging_path(self, table: str) -> str:
        return self.tables[table].staging

    def commit(
        self,
        manifests: Iterable[dict],
        shards: Iterable[dict | str] = (),
        *,
        remove_shards: Iterable[str] = (),
        counts: dict[str, int] | None = None,
        info: dict[str, Any] | None = None,
        schemas: dict[str, pa.Schema] | None = None,
        kind: str = "commit",
        score_hist: tuple[dict, bool] | None = None,
    ) -> dict:
        """Commit one group as ONE dataset version; returns its version record.

        ``manifests`` are the rows workers sent (``labelmill.schemas.tables.MANIFEST``
        as dicts: ``files`` lists staged files per table).  ``shards`` are the
        shards the group completes (``{"shard", "fingerprint"}`` or URLs);
        every row of ``remove_shards`` leaves the tables in the same version
        (pass a changed shard in both to replace it).  ``score_hist``:
        ``(histograms, approximate)`` of the group's pre-filter scores
        (:mod:`labelmill.store.yields`), kept in the record.
        """
        info = dict(info or {})
        vocabularies = info.pop("vocabularies", None)
        state = self.state()
        previous = state.latest
        version = (previous["version"] + 1) if previous else 1
        shard_items = [s if isinstance(s, dict) else {"shard": s, "fingerprint": {}} for s in shards]
        removed = sorted(set(remove_shards))
        adds: dict[str, list[dict]] = {name: [] for name in self.tables}
        for m in manifests:
            for f in m["files"]:
                adds[f["table"]].append(f)
        counts = {c: int((counts or {}).get(c, 0)) for c in (*COUNT_COLUMNS, "duplicates")}
        started = time.monotonic()
        gone_by_table = self._removals(removed, adds)
        self._write_intent(version, adds)

        table_versions: dict[str, int] = {}
        rows_by_table: dict[str, int] = {}
        for name, log in self.tables.items():
            if log.spec.emitted_by == "commit":
                continue
            new = [self._publish(log, f) for f in adds[name]]
            gone = gone_by_table.get(name, [])
            # a table with a fixed schema exists from the first commit, empty if nothing has rows for it yet, so
            # readers of any version find every table (regions' schema is known only once it has rows)
            first = log.spec.format == "delta" and not callable(log.spec.schema) and not log.exists()
            if new or gone or first:
                log.commit(new, gone, dict(info, version=version),
                           (schemas or {}).get(name) or self._schema(log, new))
            v = log.version()
            if v is not None:
                table_versions[name] = v
                rows_by_table[name] = sum(int(f["rows"]) for f in adds[name] if not f.get("rewritten"))
        stats = self._stats_row(version, shard_items, removed, counts, info, time.monotonic() - started)
        stats_log = self.tables["stats"]
        if stats is not None:
            staged = self.stage_table("stats", stats)
            stats_log.commit([self._publish(stats_log, staged)], [], dict(info, version=version), STATS)
        if stats_log.version() is not None:
            table_versions["stats"] = stats_log.version()

        record = {
            "version": version,
            "time": datetime.now(timezone.utc).isoformat(),
            "kind": kind,
            "table_versions": table_versions,
            "shards_added": shard_items,
            "shards_removed": removed,
            "rows_added": rows_by_table,
            "counts_by_status": {k: counts[k] for k in ("labelled", "no_labels", "error")},
            "counts": counts,
            "config_hash": info.get("config_hash"),
            "teacher_hashes": info.get("teacher_hashes", {}),
            "run_id": info.get("run_id"),
        }
        classes_added = vocabularies_added(state.registry(), vocabularies)
        if classes_added:
            record["classes_added"] = classes_added
        if score_hist is not None:
            record["score_hist"] = score_hist[0]
            if score_hist[1]:
                record["score_hist_approximate"] = True
        record.update({k: v for k, v in info.items() if k not in record})
        self._append_version(record)  # the commit point
        self._clear_intent()
        return record

    def _removals(self, removed: list[str], adds: dict[str, list[dict]]) -> dict[str, list[str]]:
        """Per table, the files to remove so that no row of a ``removed`` shard is left.

        A file of one shard goes.  A file of several (``labelmill optimize``) whose shard range spans a
        removed shard is read; if it holds rows of one, it goes too, and its other rows are staged again
        as a new file added to ``adds`` (copy on write: a version never reads a removed shard's rows, and
        Delta readers of any version see plain files)."""
        gone: dict[str, list[str]] = {}
        if not removed:
            return gone
        ordered, removed_set = sorted(removed), set(removed)
        doomed = pa.array(ordered, pa.string())
        for name, log in self.tables.items():
            if log.spec.emitted_by == "commit":
                continue
            for f in log.files_holding(ordered):
                if f.get("shard") is not None:
                    if f["shard"] in removed_set:
                        gone.setdefault(name, []).append(f["path"])
                    continue
                if not holds_any(f, ordered):
                    continue
                with self.fs.open(log.uri_of(f["path"]), "rb") as fh:
                    rows = pq.read_table(fh)
                keep = rows.filter(pc.invert(pc.is_in(rows.column("shard"), value_set=doomed)))
                if keep.num_rows == rows.num_rows:  # its range spans a removed shard it does not hold
                    continue
                gone.setdefault(name, []).append(f["path"])
                if keep.num_rows:
                    adds[name].append(dict(self.stage_table(name, keep), rewritten=True))
        return gone

    def rollback(self, version: int, info: dict[str, Any] | None = None) -> dict:
        """Publish a new version whose tables hold exactly the files of ``version``."""
        records = self.versions()
        target = next((r for r in records if r["version"] == version), None)
        if target is None:
            raise LookupError(f"{self.uri} has no dataset version {version}")
        info = dict(info or {}, rolled_back_to=version)
        new_version = records[-1]["version"] + 1
        self._write_intent(new_version, {})
        table_versions = {}
        for name, log in self.tables.items():
            self._restore(log, target["table_versions"].get(name), dict(info, version=new_version))
            if log.version() is not None:
                table_versions[name] = log.version()
        before = self.shard_items(records)
        after = self.shard_items([r for r in records if r["version"] <= version])
        record = {
            "version": new_version,
            "time": datetime.now(timezone.utc).isoformat(),
            "kind": "rollback",
            "table_versions": table_versions,
            "shards_added": [item for s, item in sorted(after.items()) if before.get(s) != item],
            "shards_removed": sorted(s for s in before if s not in after or before[s] != after[s]),
            "rows_added": {},
            "counts_by_status": target.get("counts_by_status", {}),
            "counts": {},
            "config_hash": target.get("config_hash"),
            "teacher_hashes": target.get("teacher_hashes", {}),
            "label_inputs": self.label_inputs(records),
            **info,
        }
        # a shard whose fingerprint changes back is removed and added in the same record
        self._append_version(record)
        self._clear_intent()
        return record

    def rewrite(self, staged: dict[str, list[dict]], replaced: dict[str, list[str]],
                info: dict[str, Any] | None = None, kind: str = "optimize") -> dict:
        """Publish one version whose rows are exactly the latest version's, in other files: per table, the
        ``staged`` files (``stage_table`` entries) replace the ``replaced`` ones (Delta ``dataChange:
        false``).  The record adds and removes no shard."""
        previous = self.state().latest
        if previous is None:
            raise LookupError(f"{self.uri} has no dataset version to rewrite")
        version = previous["version"] + 1
        info = dict(info or {})
        self._write_intent(version, staged)
        table_versions = dict(previous["table_versions"])
        for name, log in self.tables.items():
            add, remove = staged.get(name, []), replaced.get(name, [])
            if not add and not remove:
                continue
            new = [self._publish(log, f) for f in add]
            table_versions[name] = log.commit(new, remove, dict(info, version=version), self._schema(log, new),
                                              data_change=False)
        record = {
            "version": version,
            "time": datetime.now(timezone.utc).isoformat(),
            "kind": kind,
            "table_versions": table_versions,
            "shards_added": [],
            "shards_removed": [],
            "rows_added": {},
            "counts_by_status": previous.get("counts_by_status", {}),
            "counts": {},
            "config_hash": previous.get("config_hash"),
            "teacher_hashes": previous.get("teacher_hashes", {}),
            **info,
        }
        self._append_version(record)
        self._clear_intent()
        return record

    def _restore(self, log: TableLog, want_v: int | None, info: dict[str, Any]) -> None:
        """Commit adds/removes so that ``log`` holds exactly the files of its version ``want_v``."""
        want = {f["path"]: f for f in (log.files(want_v) if want_v is not None else [])}
        have = {f["path"]: f for f in log.files()}
        add = [want[p] for p in sorted(set(want) - set(have))]
        remove = sorted(set(have) - set(want))
        if add or remove:
            log.commit(add, remove, info, self._schema(log, add))

    def _schema(self, log: TableLog, files: list[dict]) -> pa.Schema | None:
        spec = log.spec
        if isinstance(spec.schema, pa.Schema):
            return spec.schema
        if not files:
            return None
        with self.fs.open(log.uri_of(files[0]["path"]), "rb") as fh:
            return pq.read_schema(fh)

    def _publish(self, log: TableLog, entry: dict) -> dict:
        """Move a staged file into its table folder; returns the entry with its final path."""
        src = log.uri_of(entry["path"])
        name = posixpath.basename(entry["path"])
        if entry["path"] != name:
            self.fs.mv(src, log.uri_of(name))
        out = {"path": name, "size": int(entry.get("bytes", entry.get("size", 0))), "rows": int(entry["rows"]),
               "stats": entry["stats"], "shard": stats_shard(entry["stats"])}
        return out

    def stage_table(self, table: str, data: pa.Table) -> dict:
        """Write ``data`` (one shard's rows, or a driver table) to ``table``'s staging folder."""
        log = self.tables[table]
        name = f"part-{uuid.uuid4().hex}.parquet"
        size = write_parquet(self.fs, posixpath.join(log.staging, name), data, self.compression,
                             log.spec.row_group_rows)
        return {"table": table, "path": f"{STAGING}/{name}", "rows": data.num_rows, "bytes": size,
                "stats": file_stats(data)}

    def _stats_row(self, version, shard_items, removed, counts, info, seconds) -> pa.Table | None:
        row = {
            "run_id": [info.get("run_id")],
            "commit": [version],
            "committed_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
            "shards": [sorted(s["shard"] for s in shard_items)],
            "seconds": [float(info.get("seconds", seconds))],
            "config_hash": [info.get("config_hash")],
        }
        for c in (*COUNT_COLUMNS, "duplicates"):
            row[c] = [counts.get(c, 0)]
        return conform(pa.table(row), STATS)

    # -------------------------------------------------------------- repair
    def _write_intent(self, version: int, adds: dict[str, list[dict]]) -> None:
        path = self._path(INTENT_FILE)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        body = {"version": version,
                "add": {t: [posixpath.basename(f["path"]) for f in fs_] for t, fs_ in adds.items() if fs_}}
        with self.fs.open(path, "w") as fh:
            json.dump(body, fh)

    def _clear_intent(self) -> None:
        path = self._path(INTENT_FILE)
        if self.fs.exists(path):
            self.fs.rm(path)

    def repair(self) -> dict[str, int]:
        """Bring the folder back to the latest version record after a crash.

        Tables whose log moved past the version the record names are put
        back to that version's files (a new log version with the same
        contents; the ``regions`` log simply drops the unrecorded entries),
        files an unfinished commit added are deleted, and every staging
        folder is emptied.
        """
        report = {"staging_files": 0, "uncommitted_files": 0, "tables_restored": 0}
        path = self._path(INTENT_FILE)
        if self.fs.exists(path):
            with self.fs.open(path, "r") as fh:
                intent = json.load(fh)
            latest = self.latest()
            if latest is None or latest["version"] < intent["version"]:
                recorded = latest["table_versions"] if latest else {}
                for name, log in self.tables.items():
                    if not log.exists():
                        continue
                    want_v = recorded.get(name)
                    if log.version() == want_v:
                        continue
                    if isinstance(log, ManifestLog):
                        log.drop_after(want_v)
                    else:
                        self._restore(log, want_v, {"repair": f"back to log version {want_v}"})
                    report["tables_restored"] += 1
                for table, names in intent.get("add", {}).items():
                    for name in names:
                        target = self.tables[table].uri_of(name)
                        if self.fs.exists(target):
                            self.fs.rm(target)
                            report["uncommitted_files"] += 1
            self.fs.rm(path)
        for log in self.tables.values():
            report["staging_files"] += log.clear_staging()
        return report

    def record_run(self, run_id: str, summary: dict) -> None:
        """Keep a run's summary under ``_labelmill/runs/`` (for people; nothing reads it back)."""
        path = self._path(f"_labelmill/runs/{run_id}.json")
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "w") as fh:
            json.dump(summary, fh, indent=2)
