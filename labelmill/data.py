# TEMPORARY stand-in until the engine branch lands; replaced by it
"""The read API of the shared contract, over today's Delta tables.

Only what the exports need: ``open``, ``versions``, ``VersionNotFound`` /
``OutputNotFound`` and, on the opened version, ``version``, ``record``,
``table_names``, ``files``, ``read``, ``iter_batches``, ``to_ray`` and
``filesystem``.  A dataset version is the samples table's Delta version
(the samples commit is the commit record); the labels table is read at its
latest Delta version committed no later than that samples version.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as pads

from labelmill.store.commit import OutputStore

TABLES = ("samples", "labels", "stats")


class OutputNotFound(LookupError):
    """The output folder does not exist or holds no committed samples."""


class VersionNotFound(LookupError):
    """The output has no such version."""


def _history(store: OutputStore, name: str) -> list[dict]:
    from deltalake import DeltaTable

    table = getattr(store, name)
    if not table.exists():
        return []
    return sorted(DeltaTable(table.uri, storage_options=table.storage).history(), key=lambda h: h["version"])


def _record(store: OutputStore, entry: dict) -> dict:
    table_versions = {"samples": entry["version"]}
    for name in ("labels", "stats"):
        older = [h["version"] for h in _history(store, name) if h["timestamp"] <= entry["timestamp"]]
        if older:
            table_versions[name] = max(older)
    time = _dt.datetime.fromtimestamp(entry["timestamp"] / 1000, tz=_dt.timezone.utc).isoformat()
    return {"version": entry["version"], "time": time, "table_versions": table_versions}


def _store(output: str, storage_options: dict | None) -> OutputStore:
    store = OutputStore(output, storage_options)
    if not store.fs.exists(store.root):
        raise OutputNotFound(f"output {output} does not exist")
    if not store.samples.exists():
        raise OutputNotFound(f"output {output} has no committed samples table (has `labelmill run` committed anything?)")
    return store


def versions(output: str, storage_options: dict | None = None) -> list[dict]:
    store = _store(output, storage_options)
    return [_record(store, h) for h in _history(store, "samples") if h["version"] >= 1]


class DatasetVersion:
    def __init__(self, store: OutputStore, record: dict):
        self._store = store
        self.output = store.uri
        self.version: int = record["version"]
        self.record = record
        import pyarrow.fs as pafs

        if store.uri.startswith(("s3://", "s3a://")):
            self.filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(store.fs))
        else:
            self.filesystem = pafs.LocalFileSystem()

    def table_names(self) -> list[str]:
        return [t for t in TABLES if t in self.record["table_versions"]]

    def _delta(self, table: str):
        from deltalake import DeltaTable

        if table not in self.record["table_versions"]:
            raise KeyError(f"version {self.version} of {self.output} has no {table!r} table")
        t = getattr(self._store, table)
        return DeltaTable(t.uri, version=self.record["table_versions"][table], storage_options=t.storage)

    def files(self, table: str) -> list[str]:
        return self._delta(table).file_uris()

    def _dataset(self, table: str) -> pads.Dataset:
        return self._delta(table).to_pyarrow_dataset()

    def read(self, table: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:  # noqa: A002
        return self._dataset(table).to_table(columns=columns, filter=filter)

    def iter_batches(self, table: str, columns: list[str] | None = None,
                     batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        yield from self._dataset(table).to_batches(columns=columns, batch_size=batch_size)

    def to_ray(self, table: str, columns: list[str] | None = None):
        import ray

        return ray.data.read_parquet(self.files(table), columns=columns)


def open(output: str, version: int | str | None = None, *,  # noqa: A001
         storage_options: dict | None = None) -> DatasetVersion:
    store = _store(output, storage_options)
    history = [h for h in _history(store, "samples") if h["version"] >= 1]
    if not history:
        raise VersionNotFound(f"output {output} has no committed version")
    if version is None:
        entry = history[-1]
    elif isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
        matches = [h for h in history if h["version"] == int(version)]
        if not matches:
            raise VersionNotFound(f"output {output} has no version {version} (versions 1..{history[-1]['version']})")
        entry = matches[0]
    else:
        try:
            when = _dt.datetime.fromisoformat(str(version))
        except ValueError:
            raise VersionNotFound(f"version {version!r} is neither a number nor an ISO timestamp") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        ms = when.timestamp() * 1000
        older = [h for h in history if h["timestamp"] <= ms]
        if not older:
            raise VersionNotFound(f"output {output} has no version at {version} (first version: "
                                  f"{_record(store, history[0])['time']})")
        entry = older[-1]
    return DatasetVersion(store, _record(store, entry))


__all__ = ["open", "versions", "OutputNotFound", "VersionNotFound", "DatasetVersion"]
