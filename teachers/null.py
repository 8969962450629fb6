"""The null teacher: no network, no forward; one fixed label per image.

It measures the engine's own ceiling (``benchmarks/bench_engine.py``): read,
decode, the label actor's batching and copies, filter and write, with the
model's cost taken out.  Each image gets one box covering the whole image,
class ``image``, score 1.0, in original pixels (built by its host side in
the finish stage, :class:`labelmill.teachers.hosts.NullHost`).
"""

from __future__ import annotations

import numpy as np

from labelmill.schemas.raw import RawBatch
from labelmill.schemas.records import Provenance, TeacherOutput
from labelmill.teachers.base import ImageBatch, Pending, Teacher
from labelmill.teachers.configs import NullTeacherConfig  # noqa: F401  (re-exported)


class NullTeacher(Teacher):
    Config = NullTeacherConfig
    type_name = "null"

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, "none", "none", self.config_hash())

    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        return self.predict_split(batch, upstream)

    def infer_async(self, batch: ImageBatch, upstream, prepared) -> Pending:
        hw = np.array([tuple(hw) for hw in batch.orig_hw], np.int64).reshape(-1, 2)
        return Pending.ready(RawBatch.from_counts({"hw": hw}, {"hw": np.ones(len(batch), np.int64)}))
