"""The read API: one pinned, consistent view of every table of a dataset version.

``open_version(output, version)`` picks a version record (the latest, a
number, or the version current at an ISO timestamp) and reads each table at
the log version that record names.  Later commits never change what a
pinned view returns: it lists its files once, from the table logs, and
staged or uncommitted files are never among them.
"""

from __future__ import annotations

import posixpath
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from labelmill.store.commit import OutputStore, holds_any, shard_range


class OutputNotFound(LookupError):
    """The output has no committed dataset version."""


class VersionNotFound(LookupError):
    """The output has no such dataset version."""


def _parse_time(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise VersionNotFound(f"version {text!r} is neither a version number nor an ISO timestamp") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def pick_record(records: list[dict], version: int | str | None, output: str) -> dict:
    if not records:
        raise OutputNotFound(f"{output} has no committed dataset version (has `labelmill run` committed anything?)")
    if version is None:
        return records[-1]
    if isinstance(version, str) and version.strip().lstrip("-").isdigit():
        version = int(version)
    if isinstance(version, int):
        for rec in records:
            if rec["version"] == version:
                return rec
        raise VersionNotFound(f"{output} has no version {version} (versions 1..{records[-1]['version']})")
    ts = _parse_time(version)
    before = [r for r in records if datetime.fromisoformat(r["time"]) <= ts]
    if not before:
        raise VersionNotFound(f"{output} had no version yet at {version} (first: {records[0]['time']})")
    return before[-1]


class DatasetVersion:
    """All tables of one dataset version; see ``labelmill.data.open``."""

    def __init__(self, store: OutputStore, record: dict):
        self.store = store
        self.output = store.uri
        self.record = record
        self.version: int = record["version"]
        self._files: dict[str, list[str]] = {}
        self._schemas: dict[str, pa.Schema | None] = {}
        self._fs = None

    def table_names(self) -> list[str]:
        return [n for n in self.store.tables if n in self.record["table_versions"]]

    def _log(self, table: str):
        if table not in self.store.tables:
            raise KeyError(f"{self.output} has no table {table!r}; tables: {sorted(self.store.tables)}")
        return self.store.tables[table]

    def paths(self, table: str) -> list[str]:
        """Filesystem paths (as ``self.filesystem`` takes them); none for a table this version never wrote."""
        if table not in self._files:
            log = self._log(table)
            if table not in self.record["table_versions"]:  # declared, but nothing committed to it yet
                self._files[table] = []
                return []
            entries = log.files(self.record["table_versions"][table])
            self._files[table] = [posixpath.join(log.path, f["path"]) for f in entries]
        return self._files[table]

    def _entries(self, table: str) -> list[dict]:
        if table not in self.record["table_versions"]:
            return []
        return self._log(table).files(self.record["table_versions"][table])

    def read_shard(self, table: str, shard: str, columns: list[str] | None = None,
                   filter: Any = None) -> pa.Table | None:
        """One shard's rows of ``table`` (None if the version has none): only the files whose shard range
        (their Delta stats) can hold it are opened, so a pinned version reads one shard in one or two file
        reads however many files it has; a group file of ``labelmill optimize`` is filtered to the shard."""
        log = self._log(table)
        mine = [f for f in self._entries(table) if holds_any(f, [shard])]
        if not mine:
            return None
        paths = [posixpath.join(log.path, f["path"]) for f in mine]
        if not all(f.get("shard") == shard for f in mine):
            filter = pads.field("shard") == shard if filter is None else (pads.field("shard") == shard) & filter
        return self.read_paths(paths, columns, filter=filter, schema=self.schema(table))

    def iter_shards(self, table: str, columns: list[str] | None = None) -> Iterator[tuple[str | None, pa.Table]]:
        """``(shard, rows)`` for every shard of ``table``, rows in file order (memory: one file, or one shard's
        files).  Shards come in order of the files' first shard."""
        log = self._log(table)
        singles: dict[str | None, list[str]] = {}
        groups: list[tuple[str, str]] = []
        for f in self._entries(table):
            path = posixpath.join(log.path, f["path"])
            lo, hi = shard_range(f.get("stats"))
            if lo is not None and lo != hi:
                groups.append((lo, path))
            else:
                singles.setdefault(f.get("shard"), []).append(path)
        schema = self.schema(table) if singles or groups else None
        work = [(s or "", "single", s) for s in singles] + [(lo, "group", path) for lo, path in groups]
        for _, kind, what in sorted(work, key=lambda w: (w[0], w[1], str(w[2]))):
            if kind == "single":
                yield what, self.read_paths(singles[what], columns, schema=schema)
                continue
            rows = self.read_paths([what], None if columns is None or "shard" in columns else [*columns, "shard"],
                                   schema=schema)
            shards = rows.column("shard")
            for shard in sorted(pc.unique(shards).to_pylist()):
                part = rows.filter(pc.equal(shards, shard))
                yield shard, part.select(columns) if columns else part

    def read_paths(self, paths: list[str], columns: list[str] | None = None, filter: Any = None,
                   schema: pa.Schema | None = None) -> pa.Table:
        """Rows of some of the version's files; ``schema``: the table's (:meth:`schema`), for files written
        before a column was added."""
        return pads.dataset(paths, schema=schema, filesystem=self.filesystem, format="parquet").to_table(
            columns=columns, filter=filter)

    def files(self, table: str) -> list[str]:
        """Absolute URIs of the Parquet files this version reads for ``table``."""
        paths = self.paths(table)
        if "://" in self.output:
            proto = self.output.split("://", 1)[0]
            return [f"{proto}://{p}" for p in paths]
        return list(paths)

    @property
    def filesystem(self):
        """A ``pyarrow.fs.FileSystem`` for :meth:`files` (and the paths without a scheme)."""
        if self._fs is None:
            from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

            if "://" not in self.output or self.output.startswith("file://"):
                self._fs = LocalFileSystem()
            else:
                self._fs = PyFileSystem(FSSpecHandler(self.store.fs))
        return self._fs

    def schema(self, table: str) -> pa.Schema | None:
        if table in self._schemas:
            return self._schemas[table]
        self._schemas[table] = self._schema(table)
        return self._schemas[table]

    def _schema(self, table: str) -> pa.Schema | None:
        paths = self.paths(table)
        if not paths:
            spec = self.store.tables[table].spec
            return spec.schema if isinstance(spec.schema, pa.Schema) else None
        # the oldest and the newest file: a column added by a later release (older rows read it as null)
        ends = paths[:1] + paths[-1:] if len(paths) > 1 else paths
        schemas = [pads.dataset([p], filesystem=self.filesystem, format="parquet").schema for p in ends]
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return schemas[0]

    def dataset(self, table: str) -> pads.Dataset:
        paths = self.paths(table)
        schema = self.schema(table)
        return pads.dataset(paths, schema=schema, filesystem=self.filesystem, format="parquet")

    def read(self, table: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        paths = self.paths(table)
        if not paths:
            schema = self.schema(table) or pa.schema([])
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return self.dataset(table).to_table(columns=columns, filter=filter)

    def iter_batches(self, table: str, columns: list[str] | None = None, batch_size: int = 65536,
                     filter: Any = None) -> Iterator[pa.RecordBatch]:
        """Stream the table file by file (memory bounded by one batch)."""
        if not self.paths(table):
            return
        yield from self.dataset(table).to_batches(columns=columns, filter=filter, batch_size=batch_size)

    def to_ray(self, table: str, columns: list[str] | None = None, **kwargs):
        import ray.data

        paths = self.paths(table)
        if not paths:
            raise ValueError(f"table {table!r} of version {self.version} has no rows")
        kwargs.setdefault("filesystem", self.filesystem)
        return ray.data.read_parquet(paths, columns=columns, **kwargs)

    def __repr__(self) -> str:
        return f"DatasetVersion({self.output!r}, version={self.version}, tables={self.table_names()})"


def readable_record(store: OutputStore, version: int | str | None) -> dict:
    """The record of ``version`` (number, ISO timestamp or None = latest), refusing vacuumed versions."""
    record = pick_record(store.versions(), version, store.uri)
    if record["version"] in store.vacuumed():
        raise VersionNotFound(f"version {record['version']} of {store.uri} was vacuumed: its files are gone "
                              "(`labelmill versions` lists what can still be read)")
    return record


def existing_output(output: str, storage_options: dict | None = None) -> OutputStore:
    """The store of an output a reading command was given; :class:`OutputNotFound` if there is none."""
    store = OutputStore(output, storage_options)
    if not store.fs.exists(store.root):
        raise OutputNotFound(f"{output} does not exist")
    return store


def open_version(output: str, version: int | str | None = None, *,
                 storage_options: dict | None = None) -> DatasetVersion:
    store = existing_output(output, storage_options)
    return DatasetVersion(store, readable_record(store, version))


def list_versions(output: str, storage_options: dict | None = None) -> list[dict]:
    return OutputStore(output, storage_options).versions()
