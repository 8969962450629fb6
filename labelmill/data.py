# TEMPORARY stand-in until the engine branch lands; replaced by it.
"""Minimal read API over today's Delta tables (the contract of issue 8).

Only what the training code needs: ``open``, ``Dataset.version``,
``.record``, ``.table_names``, ``.files``, ``.read``, ``.iter_batches``,
``.to_ray`` and ``.filesystem``.  A dataset version is the samples table's
Delta version plus one (the contract numbers versions from 1); the labels
table is read at its last version committed no later than that samples
commit.
"""

from __future__ import annotations

from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from labelmill.store.commit import delta_storage_options


class OutputNotFound(LookupError):
    """No labelmill output at that path."""


class VersionNotFound(LookupError):
    """The output has no such dataset version."""


_TABLES = ("samples", "labels", "stats")


def _delta(uri: str, storage: dict | None, version: int | None = None):
    from deltalake import DeltaTable

    return DeltaTable(uri, version=version, storage_options=storage)


class Dataset:
    def __init__(self, output: str, version: int | str | None, storage_options: dict | None):
        self.output = output.rstrip("/")
        self.storage_options = storage_options or {}
        fs, root = fsspec.core.url_to_fs(self.output, **self.storage_options)
        self._root = root
        self._uri = self.output if self.output.startswith(("s3://", "s3a://")) else root
        self._storage = delta_storage_options(self.storage_options, self.output)
        self.filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        try:
            samples = _delta(f"{self._uri}/samples", self._storage)
        except Exception as exc:
            raise OutputNotFound(f"no labelmill output at {self.output} ({type(exc).__name__})") from None
        history = sorted(samples.history(), key=lambda h: h["version"])
        if isinstance(version, str):
            import datetime as dt

            when = dt.datetime.fromisoformat(version).timestamp() * 1000
            older = [h for h in history if h["timestamp"] <= when]
            if not older:
                raise VersionNotFound(f"{self.output} has no dataset version at or before {version}")
            delta_version = older[-1]["version"]
        elif version is None:
            delta_version = history[-1]["version"]
        else:
            delta_version = int(version) - 1
            if delta_version not in {h["version"] for h in history}:
                raise VersionNotFound(f"{self.output} has no dataset version {version} "
                                      f"(versions 1..{history[-1]['version'] + 1})")
        self.version = delta_version + 1
        stamp = next(h["timestamp"] for h in history if h["version"] == delta_version)
        self._table_versions = {"samples": delta_version}
        for name in ("labels", "stats"):
            try:
                hist = _delta(f"{self._uri}/{name}", self._storage).history()
            except Exception:
                continue
            ok = [h["version"] for h in hist if h["timestamp"] <= stamp]
            if ok:
                self._table_versions[name] = max(ok)
        self.record = {"version": self.version, "time": stamp, "table_versions": dict(self._table_versions)}

    def table_names(self) -> list[str]:
        return sorted(self._table_versions)

    def files(self, table: str) -> list[str]:
        if table not in self._table_versions:
            return []
        dt = _delta(f"{self._uri}/{table}", self._storage, self._table_versions[table])
        return list(dt.file_uris())

    def _paths(self, table: str) -> list[str]:
        out = []
        for uri in self.files(table):
            out.append(uri.split("://", 1)[1] if "://" in uri else uri)
        return out

    def _dataset(self, table: str):
        from labelmill.schemas import tables as schemas

        schema = {"labels": schemas.LABELS, "samples": schemas.SAMPLES, "stats": schemas.STATS}[table]
        return pds.dataset(self._paths(table), schema=schema, format="parquet", filesystem=self.filesystem)

    def read(self, table: str, columns=None, filter=None) -> pa.Table:
        return self._dataset(table).to_table(columns=columns, filter=filter)

    def iter_batches(self, table: str, columns=None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        yield from self._dataset(table).to_batches(columns=columns, batch_size=batch_size)

    def to_ray(self, table: str, columns=None):
        import ray.data

        return ray.data.read_parquet(self.files(table), columns=columns, filesystem=self.filesystem)


def open(output: str, version: int | str | None = None, *, storage_options: dict | None = None) -> Dataset:  # noqa: A001
    return Dataset(output, version, storage_options)


def versions(output: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    latest = open(output, storage_options=storage_options)
    return [open(output, v, storage_options=storage_options).record for v in range(1, latest.version + 1)]
