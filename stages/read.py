"""Read stage: shard URLs -> encoded sample rows, one Ray read task per shard.

Each shard is streamed member by member and emitted in blocks of
``samples_per_block`` rows, so memory does not grow with shard size or
count.  After its last sample a shard emits one ``shard_end`` row carrying
the number of sample rows it produced; the writer uses it to know when the
shard is complete.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from labelmill.schemas.records import RowKind
from labelmill.schemas.tables import Col
from labelmill.io.shards import iter_shard
from labelmill.stages.base import Resources

READ_SCHEMA = pa.schema(
    [
        (Col.KEY, pa.string()),
        (Col.SHARD, pa.string()),
        (Col.INDEX, pa.int64()),
        (Col.KIND, pa.string()),
        (Col.IMAGE_BYTES, pa.binary()),
        (Col.IMAGE_EXT, pa.string()),
        (Col.CAPTION_BYTES, pa.binary()),
        (Col.META_JSON, pa.string()),
        (Col.SHARD_ROWS, pa.int64()),
        (Col.ERROR, pa.string()),
        (Col.WARNINGS, pa.list_(pa.string())),
    ]
)


class ReadShards:
    """Source stage; see the module docstring."""

    name = "read"
    requires: tuple[str, ...] = ()
    produces = tuple(READ_SCHEMA.names)
    drops: tuple[str, ...] = ()
    stateful = False

    def __init__(self, storage_options: dict[str, Any], samples_per_block: int, cpus: float):
        self.storage_options = storage_options
        self.samples_per_block = samples_per_block
        self.cpus = cpus

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def read_blocks(self, url: str) -> Iterator[pa.Table]:
        rows: dict[str, list] = {name: [] for name in READ_SCHEMA.names}
        count = 0

        def append(**values) -> None:
            for name in READ_SCHEMA.names:
                rows[name].append(values.get(name))

        def flush() -> pa.Table:
            table = pa.table(rows, schema=READ_SCHEMA)
            for lst in rows.values():
                lst.clear()
            return table

        for sample in iter_shard(url, self.storage_options):
            append(
                key=sample.key,
                shard=url,
                index=sample.index,
                kind=RowKind.SAMPLE.value,
                image_bytes=sample.image,
                image_ext=sample.image_ext,
                caption_bytes=sample.caption,
                meta_json=sample.meta,
                error=sample.error,
                warnings=sample.warnings,
            )
            count += 1
            if len(rows[Col.KEY]) >= self.samples_per_block:
                yield flush()
        append(key="", shard=url, index=count, kind=RowKind.SHARD_END.value, shard_rows=count, warnings=[])
        yield flush()

    def datasource(self, urls: list[str]) -> "ShardDatasource":
        return ShardDatasource(self, urls)


class ShardDatasource(Datasource):
    """Ray Data source with one read task per shard URL."""

    def __init__(self, stage: ReadShards, urls: list[str]):
        super().__init__()
        self.stage = stage
        self.urls = list(urls)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        stage = self.stage
        tasks = []
        for url in self.urls:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[url], exec_stats=None)
            tasks.append(ReadTask(lambda url=url: stage.read_blocks(url), meta, schema=READ_SCHEMA))
        return tasks
