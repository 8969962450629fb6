"""The output folder and its atomic, resumable commit protocol.

Layout of ``output.path``::

    labels/    Delta table, one row per kept label
    samples/   Delta table, one row per input sample  <- the commit record
    stats/     Delta table, one row per commit
    regions/   Parquet files + _manifest/ (ViLD embeddings; Delta has no float16)
    _labelmill/config.json   the config (and its hash) that owns this output

Commit protocol for a group of completed shards:

1. every table's rows are written as Parquet files under ``<table>/_staging``
   (invisible to Delta readers and, being under ``_``, to plain Parquet
   readers too), each file carrying ``labelmill.io.shards`` in its footer;
2. files are moved into their table folder and committed table by table:
   labels, regions, then **samples last**, then stats;
3. a shard is done iff a samples file lists it.

On start, :meth:`OutputStore.repair` clears staging, removes any file that no
table's log references (a crash between move and commit), and drops labels
or regions files whose shards never reached the samples table (a crash
between two table commits).  So a run killed at any moment and restarted
ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelmill.schemas.tables import LABELS, SAMPLES, STATS

SHARDS_META = b"labelmill.io.shards"
COMMIT_META = b"labelmill.commit"
CONFIG_FILE = "_labelmill/config.json"


class OutputConflictError(RuntimeError):
    """The output folder belongs to a different configuration."""


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


def _file_stats(table: pa.Table) -> str:
    """Delta ``stats`` JSON: row count plus min/max/nulls of flat columns."""
    mins, maxs, nulls = {}, {}, {}
    for field in table.schema:
        if not (pa.types.is_string(field.type) or pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            continue
        col = table.column(field.name)
        nulls[field.name] = col.null_count
        if table.num_rows and col.null_count < table.num_rows:
            mm = pc.min_max(col)
            mins[field.name], maxs[field.name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


@dataclass
class StagedFile:
    name: str          # file name inside the table folder
    size: int
    stats: str
    shards: list[str]


class _Table:
    """Shared parts of a committed table: staging, footers, orphan cleanup."""

    #: rows per Parquet row group; the unit a reader of one image fetches
    row_group_rows = 4096

    def __init__(self, fs, root: str, name: str, schema: pa.Schema, compression: str):
        self.fs = fs
        self.name = name
        self.path = posixpath.join(root, name)
        self.schema = schema
        self.compression = None if compression == "none" else compression

    @property
    def staging(self) -> str:
        return posixpath.join(self.path, "_staging")

    def stage(self, table: pa.Table, shards: list[str], commit: int | None) -> StagedFile:
        """Write ``table`` to staging; ``commit=None`` for files staged before their commit is known."""
        meta = dict(table.schema.metadata or {})
        meta[SHARDS_META] = json.dumps(sorted(set(shards))).encode()
        if commit is not None:
            meta[COMMIT_META] = str(commit).encode()
        table = table.replace_schema_metadata(meta)
        seq = "spill" if commit is None else f"{commit:06d}"
        name = f"part-{seq}-{uuid.uuid4().hex[:12]}.parquet"
        self.fs.makedirs(self.staging, exist_ok=True)
        target = posixpath.join(self.staging, name)
        with self.fs.open(target, "wb") as fh:
            pq.write_table(table, fh, compression=self.compression, row_group_size=self.row_group_rows)
        return StagedFile(name=name, size=int(self.fs.size(target)), stats=_file_stats(table), shards=shards)

    def publish(self, staged: Iterable[StagedFile], clear: bool = True) -> None:
        """Move staged files into the table folder (still uncommitted)."""
        for f in staged:
            self.fs.mv(posixpath.join(self.staging, f.name), posixpath.join(self.path, f.name))
        if clear:
            self.clear_staging()

    def file_shards(self, name: str) -> list[str]:
        with self.fs.open(posixpath.join(self.path, name), "rb") as fh:
            meta = pq.read_metadata(fh).metadata or {}
        return json.loads(meta.get(SHARDS_META, b"[]"))

    def data_files_on_disk(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        return sorted(
            posixpath.basename(p)
            for p in self.fs.ls(self.path, detail=False)
            if p.endswith(".parquet")
        )

    def clear_staging(self) -> int:
        if not self.fs.exists(self.staging):
            return 0
        n = len(self.fs.ls(self.staging, detail=False))
        self.fs.rm(self.staging, recursive=True)
        return n

    # interface of the concrete formats
    def exists(self) -> bool: ...
    def committed_files(self) -> list[str]: ...
    def commit(self, add: list[StagedFile], remove: list[str], info: dict[str, Any]) -> None: ...

    def committed_shards(self) -> dict[str, list[str]]:
        """Committed file name -> shards it holds."""
        return {name: self.file_shards(name) for name in self.committed_files()}

    def remove_orphans(self) -> list[str]:
        committed = set(self.committed_files())
        orphans = [n for n in self.data_files_on_disk() if n not in committed]
        for name in orphans:
            self.fs.rm(posixpath.join(self.path, name))
        return orphans


class DeltaTableStore(_Table):
    """A Delta Lake table whose data files labelmill writes and commits itself."""

    def __init__(self, fs, root: str, name: str, schema: pa.Schema, compression: str, uri: str, storage):
        super().__init__(fs, root, name, schema, compression)
        self.uri = uri.rstrip("/") + "/" + name
        self.storage = storage

    def _table(self):
        from deltalake import DeltaTable

        return DeltaTable(self.uri, storage_options=self.storage)

    def exists(self) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.uri, storage_options=self.storage)

    def committed_files(self) -> list[str]:
        if not self.exists():
            return []
        actions = pa.table(self._table().get_add_actions(flatten=True))
        return sorted(actions.column("path").to_pylist())

    def commit(self, add: list[StagedFile], remove: list[str], info: dict[str, Any]) -> None:
        from deltalake import CommitProperties, DeltaTable
        from deltalake.transaction import AddAction, RemoveAction

        now = int(time.time() * 1000)
        actions: list[Any] = [
            AddAction(path=f.name, size=f.size, partition_values={}, modification_time=now, data_change=True, stats=f.stats)
            for f in add
        ]
        if remove:
            actions += [RemoveAction(path=n, data_change=True, deletion_timestamp=now) for n in remove]
        props = CommitProperties(custom_metadata={"labelmill": json.dumps(info, sort_keys=True)})
        if not self.exists():
            DeltaTable.create(self.uri, schema=self.schema, storage_options=self.storage)
        self._table().create_write_transaction(actions, mode="append", schema=self.schema, commit_properties=props)
        # Removed files only ever held rows of uncommitted groups: delete them so
        # plain-Parquet readers (pandas, DuckDB, Ray read_parquet) agree with Delta.
        for name in remove:
            self.fs.rm(posixpath.join(self.path, name))


class ManifestTableStore(_Table):
    """Plain Parquet files plus a numbered JSON manifest per commit.

    Used for tables with types Delta Lake cannot express (float16 vectors).
    ``_manifest/00000012.json`` holds ``{"add": [...], "remove": [...]}``;
    the committed set is the replay of all manifests in order.  Row groups
    are small (a few MB of embeddings) so one image can be read without its
    neighbours.
    """

    row_group_rows = 32

    @property
    def manifest_dir(self) -> str:
        return posixpath.join(self.path, "_manifest")

    def exists(self) -> bool:
        return self.fs.exists(self.manifest_dir)

    def _manifests(self) -> list[str]:
        if not self.exists():
            return []
        return sorted(p for p in self.fs.ls(self.manifest_dir, detail=False) if p.endswith(".json"))

    def committed_files(self) -> list[str]:
        files: dict[str, None] = {}
        for path in self._manifests():
            with self.fs.open(path, "r") as fh:
                entry = json.load(fh)
            for name in entry.get("add", []):
                files[name] = None
            for name in entry.get("remove", []):
                files.pop(name, None)
        return sorted(files)

    def commit(self, add: list[StagedFile], remove: list[str], info: dict[str, Any]) -> None:
        self.fs.makedirs(self.manifest_dir, exist_ok=True)
        manifests = self._manifests()
        seq = int(posixpath.basename(manifests[-1]).split(".")[0]) + 1 if manifests else 0
        body = json.dumps({"add": [f.name for f in add], "remove": list(remove), "info": info}, sort_keys=True)
        tmp = posixpath.join(self.staging, f"manifest-{uuid.uuid4().hex}.json")
        self.fs.makedirs(self.staging, exist_ok=True)
        with self.fs.open(tmp, "w") as fh:
            fh.write(body)
        self.fs.mv(tmp, posixpath.join(self.manifest_dir, f"{seq:08d}.json"))
        for name in remove:
            self.fs.rm(posixpath.join(self.path, name))


class OutputStore:
    """All tables of one output folder."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None, compression: str = "zstd"):
        self.uri = path.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        if self.uri.startswith(("s3://", "s3a://")):
            delta_uri = self.uri
        else:
            delta_uri = self.root
        storage = delta_storage_options(self.storage_options, self.uri)
        self.compression = compression
        self.samples = DeltaTableStore(self.fs, self.root, "samples", SAMPLES, compression, delta_uri, storage)
        self.labels = DeltaTableStore(self.fs, self.root, "labels", LABELS, compression, delta_uri, storage)
        self.stats = DeltaTableStore(self.fs, self.root, "stats", STATS, compression, delta_uri, storage)
        self._regions: ManifestTableStore | None = None

    def regions(self, schema: pa.Schema | None = None) -> ManifestTableStore:
        if self._regions is None or (schema is not None and self._regions.schema != schema):
            self._regions = ManifestTableStore(self.fs, self.root, "regions", schema or pa.schema([]), self.compression)
        return self._regions

    # ------------------------------------------------------------- config
    def read_config(self) -> dict | None:
        path = posixpath.join(self.root, CONFIG_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as fh:
            return json.load(fh)

    def claim(self, config: dict, config_hash: str) -> None:
        """Record the owning config, or refuse if another config owns the output."""
        existing = self.read_config()
        if existing is not None:
            if existing.get("config_hash") != config_hash:
                raise OutputConflictError(
                    f"output {self.uri} holds labels of config {existing.get('config_hash')}, but this run's "
                    f"config hashes to {config_hash}: labels would mix. Use a new output.path, or delete the "
                    "folder to start over."
                )
            return
        if self.samples.exists():
            raise OutputConflictError(f"output {self.uri} has a samples table but no {CONFIG_FILE}; refusing")
        path = posixpath.join(self.root, CONFIG_FILE)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "w") as fh:
            json.dump({"config_hash": config_hash, "config": config}, fh, indent=2, sort_keys=True)

    # ------------------------------------------------------------- resume
    def done_shards(self) -> set[str]:
        done: set[str] = set()
        for shards in self.samples.committed_shards().values():
            done.update(shards)
        return done

    def repair(self) -> dict[str, int]:
        """Bring the folder back to a consistent state after a crash (see module doc)."""
        report = {"staging_files": 0, "orphan_files": 0, "uncommitted_group_files": 0}
        tables: list[_Table] = [self.samples, self.labels, self.stats]
        if self.fs.exists(posixpath.join(self.root, "regions")):
            tables.append(self.regions())
        for table in tables:
            report["staging_files"] += table.clear_staging()
            report["orphan_files"] += len(table.remove_orphans())
        done = self.done_shards()
        for table in tables[1:]:
            if table is self.stats:
                continue
            stale = [name for name, shards in table.committed_shards().items() if not set(shards) <= done]
            if stale:
                table.commit([], stale, {"repair": "drop files of shards the samples table never committed"})
                report["uncommitted_group_files"] += len(stale)
        return report

    def commit_group(
        self,
        commit: int,
        shards: list[str],
        samples: pa.Table,
        labels: pa.Table,
        regions: list[StagedFile],
        stats: pa.Table,
        info: dict[str, Any],
    ) -> None:
        """Commit one group of complete shards.

        ``regions`` are files the writer staged earlier with
        :meth:`stage_regions` (embeddings are spilled as they arrive rather
        than held until their shard completes).
        """
        info = dict(info, commit=commit, shards=sorted(shards))
        if labels.num_rows:
            staged = [self.labels.stage(labels, shards, commit)]
            self.labels.publish(staged)
            self.labels.commit(staged, [], info)
        if regions:
            self.regions().publish(regions, clear=False)  # other shards' spills stay staged
            self.regions().commit(regions, [], info)
        for table, data in ((self.samples, samples), (self.stats, stats)):  # samples last: the commit record
            staged = [table.stage(data, shards, commit)]
            table.publish(staged)
            table.commit(staged, [], info)

    def stage_regions(self, regions: pa.Table, shard: str) -> StagedFile:
        """Write region rows of one shard to the regions staging area (not yet visible).

        The commit that will publish them is not known yet, so the file
        carries its shard but no commit number; the manifest records which
        commit added it.
        """
        return self.regions(regions.schema).stage(regions, [shard], None)

    def next_commit(self) -> int:
        files = self.samples.committed_files()
        seqs = [int(n.split("-")[1]) for n in files if n.startswith("part-")]
        return max(seqs) + 1 if seqs else 0
