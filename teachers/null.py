"""The null teacher: no network, no forward; one fixed label per image.

It measures the engine's own ceiling (``benchmarks/bench_engine.py``): read,
decode, the label actor's batching and copies, filter and write, with the
model's cost taken out.  Each image gets one box covering the whole image,
class ``image``, score 1.0, in original pixels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from labelmill.schemas.records import ImageRequest, Label, Provenance, TeacherOutput
from labelmill.teachers.base import ImageBatch, Teacher, TeacherConfig


class NullTeacherConfig(TeacherConfig):
    type: Literal["null"] = "null"
    short_side: int = Field(default=448, gt=0, description="working resolution the decoder delivers")
    max_long_side: int = Field(default=1333, gt=0)

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=self.short_side, max_long_side=self.max_long_side)


class NullTeacher(Teacher):
    Config = NullTeacherConfig
    type_name = "null"

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, "none", "none", self.config_hash())

    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        outs = []
        for h, w in batch.orig_hw:
            box = (0.0, 0.0, float(w), float(h))
            outs.append(TeacherOutput(labels=[Label(kind="box", score=1.0, bbox=box, class_name="image", area=float(w * h))]))
        return outs
