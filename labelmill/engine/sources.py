"""Ray Data sources for the engine: one read task per input shard."""

from __future__ import annotations

import time

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class ShardDatasource(Datasource):
    """Ray Data source with one read task per shard URL; the task runs the source stage's ``read_blocks``."""

    def __init__(self, stage, urls: list[str], meter=None):
        super().__init__()
        self.stage = stage
        self.urls = list(urls)
        self.meter = meter  # sends the read stage's (rows, seconds) to the engine's progress line

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        stage, meter = self.stage, self.meter
        schema = getattr(stage, "output_schema", None)
        tasks = []
        for url in self.urls:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[url], exec_stats=None)
            tasks.append(ReadTask(lambda url=url: _metered(stage.read_blocks(url), stage.name, meter), meta,
                                  schema=schema))
        return tasks


def _metered(blocks, name: str, meter):
    """Yield ``blocks``, counting their rows and the seconds spent making them."""
    if meter is None:
        yield from blocks
        return
    from labelmill.engine.progress import StageMeter

    counts = StageMeter(meter)
    t0 = time.perf_counter()
    for block in blocks:
        counts.add(name, block.num_rows, time.perf_counter() - t0)
        yield block
        t0 = time.perf_counter()
    counts.flush()
