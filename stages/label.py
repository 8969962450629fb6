"""Label stage: the run's teachers, in a pool of Ray actors (GPU or CPU).

``setup`` builds every teacher once per actor.  Each batch is cut into
forward batches of ``batch_size`` images; the teachers run in config order
on the same decoded pixels, each seeing the outputs of those before it.
If a teacher raises on a forward batch, the images are retried one by one
and only the ones that still fail get an error row; the run goes on.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import numpy as np
import pyarrow as pa
import torch

from labelmill.schemas.records import TeacherOutput
from labelmill.schemas.tables import LABEL_STRUCT, Col, label_to_struct, meta_dict, regions_array
from labelmill.stages.base import Resources, Stage
from labelmill.teachers.base import ImageBatch, Teacher, TeacherConfig, build_teacher


def pick_device(preference: str, gpus: float) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and (gpus > 0 or preference == "cuda"):
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("ray.device=cuda but this worker sees no CUDA device")
    return torch.device("cpu")


class LabelImages(Stage):
    name = "label"
    role = "model"
    requires = (Col.ERROR, Col.WARNINGS, Col.IMAGE, Col.ORIG_H, Col.ORIG_W, Col.CAPTION, Col.META_JSON)
    produces = (Col.LABELS, Col.REGIONS, Col.PROVENANCE)
    drops = (Col.IMAGE,)
    stateful = True

    def __init__(
        self,
        teachers: list[TeacherConfig],
        *,
        allow_random_init: bool,
        batch_size: int,
        cpus: float = 1.0,
        gpus: float = 0.0,
        torch_threads: int | None = None,
        device: str = "auto",
    ):
        self.teacher_configs = teachers
        self.allow_random_init = allow_random_init
        self.batch_size = batch_size
        self.cpus = cpus
        self.gpus = gpus
        self.torch_threads = torch_threads
        self.device_preference = device
        self.teachers: list[Teacher] = []
        #: teacher name -> [seconds in its forward passes, images] (what ``labelmill run --dry-run`` times)
        self.teacher_seconds: dict[str, list] = {}

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus)

    @property
    def wants_gpu(self) -> bool:
        """Whether the engine should give the actors GPUs when the cluster has (or can start) them."""
        return self.device_preference != "cpu"

    def place(self, resources: Resources, threads: int | None = None) -> None:
        self.cpus, self.gpus, self.torch_threads = resources.cpus, resources.gpus, threads

    def setup(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
            os.environ["OMP_NUM_THREADS"] = str(self.torch_threads)
        self.device = pick_device(self.device_preference, self.gpus)
        self.teachers = [build_teacher(cfg, self.device, self.allow_random_init) for cfg in self.teacher_configs]
        self.provenance_json = json.dumps(
            {t.name: t.provenance().__dict__ for t in self.teachers}, sort_keys=True
        )

    # ----------------------------------------------------------------- run
    def _image_batch(self, rows: list[int], images, orig_h, orig_w, captions, keys, metas) -> ImageBatch:
        side = max(max(images[r].shape[0], images[r].shape[1]) for r in rows)
        canvas = torch.zeros((len(rows), side, side, 3), dtype=torch.uint8)
        for j, r in enumerate(rows):
            img = images[r]
            canvas[j, : img.shape[0], : img.shape[1]] = torch.from_numpy(np.ascontiguousarray(img))
        if self.device.type == "cuda":
            canvas = canvas.pin_memory().to(self.device, non_blocking=True)
        return ImageBatch(
            canvas=canvas,
            work_hw=[(int(images[r].shape[0]), int(images[r].shape[1])) for r in rows],
            orig_hw=[(int(orig_h[r]), int(orig_w[r])) for r in rows],
            captions=[captions[r] for r in rows],
            keys=[keys[r] for r in rows],
            metas=[meta_dict(metas[r]) for r in rows],
        )

    def _run_teacher(self, teacher: Teacher, batch: ImageBatch, upstream) -> tuple[list, list[str | None]]:
        """Outputs per image (None where it failed) and per-image failure reasons."""
        try:
            with torch.inference_mode():
                outs = teacher.predict(batch, upstream)
            if len(outs) != len(batch):
                raise RuntimeError(f"returned {len(outs)} outputs for {len(batch)} images")
            return list(outs), [None] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [None], [f"teacher {teacher.name} failed: {traceback.format_exc(limit=2).strip()}"]
            batch_failure = f"{type(exc).__name__}: {exc}"
        # the batch failed: retry image by image; only images that fail alone become errors,
        # and the ones that succeed say that their batch failed
        outs: list[TeacherOutput | None] = []
        errors: list[str | None] = []
        for i in range(len(batch)):
            one_up = {name: [vals[i]] for name, vals in upstream.items()}
            o, e = self._run_teacher(teacher, batch.subset([i]), one_up)
            if o[0] is not None:
                o[0].warnings.append(f"teacher {teacher.name}: batched forward failed ({batch_failure}); labelled alone")
            outs.extend(o)
            errors.extend(e)
        return outs, errors

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        todo = [i for i in range(n) if errors[i] is None]
        labels: list[list[dict]] = [[] for _ in range(n)]
        regions: list[list[tuple]] = [[] for _ in range(n)]
        if todo:
            images = batch.column(Col.IMAGE).combine_chunks().to_numpy()
            orig_h = batch.column(Col.ORIG_H).to_pylist()
            orig_w = batch.column(Col.ORIG_W).to_pylist()
            captions = batch.column(Col.CAPTION).to_pylist()
            keys = batch.column(Col.KEY).to_pylist()
            metas = batch.column(Col.META_JSON).to_pylist()
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start : start + self.batch_size]
                ib = self._image_batch(rows, images, orig_h, orig_w, captions, keys, metas)
                self._label(ib, rows, labels, regions, errors, warns)
        out = batch.drop_columns([Col.IMAGE])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        out = out.append_column(Col.LABELS, pa.array(labels, pa.list_(LABEL_STRUCT)))
        out = out.append_column(Col.REGIONS, regions_array(regions))
        return out.append_column(Col.PROVENANCE, pa.array([self.provenance_json] * n, pa.string()))

    def _label(self, ib: ImageBatch, rows: list[int], labels, regions, errors, warns) -> None:
        upstream: dict[str, list[TeacherOutput | None]] = {}
        for teacher in self.teachers:
            idx = list(range(len(rows)))
            if teacher.needs_caption():
                idx = [j for j in idx if ib.captions[j]]
                for j in set(range(len(rows))) - set(idx):
                    warns[rows[j]].append(f"teacher {teacher.name} skipped: no caption")
            sub = ib if len(idx) == len(rows) else ib.subset(idx)
            sub_up = {k: [v[j] for j in idx] for k, v in upstream.items()}
            outs = [None] * len(rows)
            if idx:
                t0 = time.perf_counter()
                got, errs = self._run_teacher(teacher, sub, sub_up)
                if sub.canvas.device.type == "cuda":
                    torch.cuda.synchronize(sub.canvas.device)
                spent = self.teacher_seconds.setdefault(teacher.name, [0.0, 0])
                spent[0] += time.perf_counter() - t0
                spent[1] += len(idx)
                for j, o, e in zip(idx, got, errs):
                    outs[j] = o
                    if e is not None and errors[rows[j]] is None:
                        errors[rows[j]] = e
            upstream[teacher.name] = outs
            for j, out in enumerate(outs):
                if out is None:
                    continue
                r = rows[j]
                labels[r].extend(label_to_struct(lab, teacher.name) for lab in out.labels)
                if out.regions is not None:
                    regions[r].append((teacher.name, out.regions))
                warns[r].extend(out.warnings)
        for j, r in enumerate(rows):
            if errors[r] is not None:  # a failed sample keeps no partial labels
                labels[r] = []
                regions[r] = []
