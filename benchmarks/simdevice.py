"""A simulated device for ``bench_engine.py --simulate-device``: everything real but the forward.

``type: simdevice:SimulatedTeacher`` wraps a real teacher's config section:

* its host side is the real teacher's (:class:`SimulatedHost` delegates), so
  the ``prepare`` and ``finish`` stages do exactly the real host work (GLIP's
  noun phrases and tokens, MaskCLIP's RLE, label rows, regions);
* in the ``infer`` stage, ``infer_async`` waits ``ms_per_batch`` with
  ``time.sleep`` (which releases the GIL, as a CUDA sync does) and returns
  the raw results the real teacher's ``infer_async`` produced for the same
  photos beforehand (:func:`record`), sliced without per-image Python.

Sample keys are ``%08d`` counters over the photos (``workload.build_shards``),
so key ``k`` is photo ``k % photos``; the recording holds every photo once.
Ray workers import this module by its top-level name: the benchmark puts
``benchmarks/`` on ``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from labelmill.schemas.raw import RawBatch
from labelmill.schemas.records import ImageRequest, Provenance
from labelmill.teachers.base import (
    FinishInfo, HostSide, ImageBatch, Pending, Teacher, TeacherConfig, host_side, validate_teacher_config,
)


class SimulatedConfig(TeacherConfig):
    host_side_path: ClassVar[str | None] = "simdevice:SimulatedHost"

    teacher: dict[str, Any] = Field(description="the real teacher's config section")
    recording: str = Field(description="Arrow IPC file from record(): photo index, raw results")
    ms_per_batch: float = Field(default=0.0, ge=0, description="simulated device time per forward batch")

    def real(self) -> TeacherConfig:
        return validate_teacher_config(self.teacher)

    def image_request(self) -> ImageRequest:
        return self.real().image_request()


class SimulatedHost(HostSide):
    """The real teacher's host side under the simulated teacher's name."""

    def __init__(self, config: SimulatedConfig):
        super().__init__(config)
        self.real = host_side(config.real())

    def prepared_type(self):
        return self.real.prepared_type()

    def prepare(self, captions, metas):
        return self.real.prepare(captions, metas)

    def raw_fields(self):
        return self.real.raw_fields()

    def finish(self, raw: RawBatch, info: FinishInfo):
        return self.real.finish(raw, info)

    def proposals(self, raw: RawBatch, i: int, orig_hw):
        return self.real.proposals(raw, i, orig_hw)


class SimulatedTeacher(Teacher):
    Config = SimulatedConfig

    def __init__(self, config: SimulatedConfig, device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        import pyarrow as pa

        with pa.memory_map(config.recording) as source:
            table = pa.ipc.open_file(source).read_all()
        self.photos = table.num_rows
        self.recorded = RawBatch.from_arrow(table.column("raw"))
        self.needs = self.config.real().type == "glip" and self.config.real().mode == "caption"

    def needs_caption(self) -> bool:
        return self.needs

    def provenance(self) -> Provenance:
        return Provenance(self.name, "simulated", "simulated", "simulated", self.config_hash())

    def predict(self, batch: ImageBatch, upstream):
        return self.predict_split(batch, upstream)

    def infer_async(self, batch: ImageBatch, upstream, prepared) -> Pending:
        if self.config.ms_per_batch:
            time.sleep(self.config.ms_per_batch / 1000)  # the device's time; releases the GIL
        idx = np.array([int(k) for k in batch.keys], np.int64) % self.photos
        runs = np.flatnonzero(np.diff(idx) != 1) + 1  # cut where the photo index does not step by one
        parts = [self.recorded.slice(int(seg[0]), int(seg[-1]) + 1) for seg in np.split(idx, runs)]
        return Pending.ready(RawBatch.concat(parts) if len(parts) > 1 else parts[0])


def record(section: dict, blobs: list[bytes], path: str, *, batch: int = 8, upstream_section: dict | None = None,
           caption: str = "a person riding a horse near a car") -> dict:
    """Run the real teacher's prepare + infer on every photo once (CPU) and save its raw results.

    ``upstream_section``: an earlier teacher whose results feed this one (ViLD's GLIP proposals).
    """
    import pyarrow as pa
    import torch

    from labelmill.io.images import decode_image
    from labelmill.stages.prepare import merge_requests
    from labelmill.teachers.base import build_teacher, upstream_views

    device = torch.device("cpu")
    cfgs = [validate_teacher_config(s) for s in ([upstream_section] if upstream_section else []) + [section]]
    teachers = [build_teacher(c, device, allow_random_init=True) for c in cfgs]
    request = merge_requests([c.image_request() for c in cfgs])
    parts = []
    t0 = time.perf_counter()
    for start in range(0, len(blobs), batch):
        decoded = [decode_image(b, request, 10**9) for b in blobs[start : start + batch]]
        ib = ImageBatch(None, [d.pixels.shape[:2] for d in decoded], [d.orig_hw for d in decoded],
                        [caption] * len(decoded), [str(start + j) for j in range(len(decoded))],
                        [{} for _ in decoded], host=[d.pixels for d in decoded],
                        images=[torch.from_numpy(np.ascontiguousarray(d.pixels)) for d in decoded])
        upstream = {}
        for teacher in teachers:
            prepared = teacher.host.prepare(list(ib.captions), list(ib.metas))
            with torch.inference_mode():
                raw = teacher.infer_async(ib, upstream, prepared).result()
            upstream[teacher.name] = upstream_views(teacher.host, raw, ib.orig_hw)
        raw.extras = None
        parts.append(raw)
    raw = RawBatch.concat(parts)
    table = pa.table({"photo": np.arange(len(raw)), "raw": raw.to_arrow()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return {"photos": len(raw), "seconds": round(time.perf_counter() - t0, 1),
            "raw_bytes_per_photo": round(raw.to_arrow().nbytes / max(len(raw), 1))}
