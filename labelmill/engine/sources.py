"""Ray Data sources for the engine: one read task per input shard."""

from __future__ import annotations

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class ShardDatasource(Datasource):
    """Ray Data source with one read task per shard URL; the task runs the source stage's ``read_blocks``."""

    def __init__(self, stage, urls: list[str]):
        super().__init__()
        self.stage = stage
        self.urls = list(urls)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        stage = self.stage
        schema = getattr(stage, "output_schema", None)
        tasks = []
        for url in self.urls:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[url], exec_stats=None)
            tasks.append(ReadTask(lambda url=url: stage.read_blocks(url), meta, schema=schema))
        return tasks
