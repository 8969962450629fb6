"""Read stage: shard URLs -> encoded sample rows, one Ray read task per shard.

Each shard is streamed member by member and emitted in blocks of
``samples_per_block`` rows, so memory does not grow with shard size or
count.  The data plane carries samples only: when a shard is finished the
task reports ``(shard, rows, duplicates)`` out of band to the engine's
shard ledger (:attr:`ReadShards.reporter`); the driver knows a shard is
complete when the write manifests it received cover that many rows.

A key seen earlier in the same shard is not a second sample: the first
copy wins and later copies are only counted (``duplicates`` in ``stats``
and the version record), so ``(shard, key)`` is unique in every table.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa

from labelmill.io.shards import READ_ATTEMPTS, READ_BACKOFF_S, ShardUnavailable, iter_shard
from labelmill.schemas.tables import Col
from labelmill.stages.base import Resources, Stage

READ_SCHEMA = pa.schema(
    [
        (Col.KEY, pa.string()),
        (Col.SHARD, pa.string()),
        (Col.INDEX, pa.int64()),
        (Col.IMAGE_BYTES, pa.binary()),
        (Col.IMAGE_EXT, pa.string()),
        (Col.CAPTION_BYTES, pa.binary()),
        (Col.META_JSON, pa.string()),
        (Col.ERROR, pa.string()),
        (Col.WARNINGS, pa.list_(pa.string())),
    ]
)


class ReadShards(Stage):
    """Source stage; see the module docstring.  Its job is :meth:`read_blocks` (one shard)."""

    name = "read"
    role = "source"
    requires: tuple[str, ...] = ()
    produces = tuple(READ_SCHEMA.names)
    output_schema = READ_SCHEMA
    drops: tuple[str, ...] = ()
    stateful = False
    batch_format = "pyarrow"

    def __init__(self, storage_options: dict[str, Any], samples_per_block: int, cpus: float = 0.25,
                 attempts: int = READ_ATTEMPTS, backoff_s: float = READ_BACKOFF_S):
        self.storage_options = storage_options
        self.samples_per_block = samples_per_block
        self.cpus = cpus
        self.attempts = attempts
        self.backoff_s = backoff_s
        #: ``reporter(shard, rows, duplicates, failed)`` once a shard is read or has failed (set by the engine);
        #: ``failed`` is None, or why the storage could not deliver the shard (none of its rows may be committed)
        self.reporter: Callable[..., None] | None = None

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def process_batch(self, batch):
        raise TypeError("the source stage reads shards (read_blocks); it does not transform batches")

    def read_blocks(self, url: str) -> Iterator[pa.Table]:
        rows: dict[str, list] = {name: [] for name in READ_SCHEMA.names}
        count = duplicates = 0
        keys: set[str] = set()
        failed: str | None = None

        def flush() -> pa.Table:
            table = pa.table(rows, schema=READ_SCHEMA)
            for lst in rows.values():
                lst.clear()
            return table

        try:
            for sample in iter_shard(url, self.storage_options, attempts=self.attempts, backoff_s=self.backoff_s):
                if sample.duplicate_of is not None:
                    duplicates += 1
                    continue
                key = sample.key
                if key in keys:  # the row that records where a broken shard broke
                    key = f"{key}#broken"
                keys.add(key)
                values = dict(key=key, shard=url, index=sample.index, image_bytes=sample.image,
                              image_ext=sample.image_ext, caption_bytes=sample.caption, meta_json=sample.meta,
                              error=sample.error, warnings=sample.warnings)
                for name in READ_SCHEMA.names:
                    rows[name].append(values[name])
                count += 1
                if len(rows[Col.KEY]) >= self.samples_per_block:
                    yield flush()
        except ShardUnavailable as exc:  # storage, not data: the shard is failed (the driver drops its rows)
            failed = str(exc)
        if rows[Col.KEY] and failed is None:
            yield flush()
        if self.reporter is not None:
            self.reporter(url, count, duplicates, failed)
