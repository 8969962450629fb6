"""Label stage: the run's teachers, in a pool of Ray actors (GPU or CPU).

``setup`` builds every teacher once per actor.  Each batch is cut into
forward batches of ``batch_size`` images; the teachers run in config order
on the same decoded pixels, each seeing the outputs of those before it
(a teacher's own ``batch_size`` cuts its share further).  If a teacher
raises on a forward batch, the images are retried one by one and only the
ones that still fail get an error row; the run goes on.

Inside the actor the forward batches run as a three-step pipeline, so the
device never waits on the actor's own CPU work::

    prepare batch i+1            forward batch i              finish batch i-1
    (decode if ray.decode=actor, (teachers' device work:      (wait for the results'
     canvas, pinned memory,       forward, post-processing,    device-to-host copy,
     host-to-device copy on a     one device-to-host copy      RLE, label rows)
     copy stream)                 started per batch)

Preparing and finishing run on one helper thread each; on CUDA the copies use
their own streams (:mod:`labelmill.models.transfer`).  The same code runs on
CPU, where the helper threads overlap decoding and encoding with the forward.
Only the last teacher of the run finishes on the helper thread: the outputs
of earlier ones may be read by the next teacher (``upstream``), so they
finish at once.  A call returns only when its batches are finished, so the
pipeline cannot reach across calls: the stage asks the engine for
``batches_per_call`` (4) forward batches per call, and only the first
preparation and the last finishing of a call run beside no forward.

With ``decode="actor"`` the stage takes the reader's raw bytes and decodes
each forward batch itself (:func:`labelmill.io.images.decode_batch`: nvJPEG
on a GPU, PIL otherwise), instead of the decode tasks doing it before.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from labelmill.io.images import ImageDecodeError, decode_batch
from labelmill.models.transfer import DeviceTensor, side_stream
from labelmill.schemas.records import ImageRequest, TeacherOutput
from labelmill.schemas.tables import LABEL_STRUCT, Col, label_to_struct, meta_dict, regions_array
from labelmill.stages.base import Resources, Stage
from labelmill.stages.decode import read_captions
from labelmill.teachers.base import ImageBatch, Pending, Teacher, TeacherConfig, build_teacher


def pick_device(preference: str, gpus: float) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and (gpus > 0 or preference == "cuda"):
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("ray.device=cuda but this worker sees no CUDA device")
    return torch.device("cpu")


@dataclass
class _Prepared:
    rows: list[int]  # batch rows of the images in ``batch``
    batch: ImageBatch | None
    canvas: DeviceTensor | None


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
        decode: str = "tasks",
        request: ImageRequest | None = None,
        max_pixels: int = 90_000_000,
        batches_per_call: int = 4,
    ):
        if decode not in ("tasks", "actor"):
            raise ValueError(f"decode must be 'tasks' or 'actor', not {decode!r}")
        if decode == "actor" and request is None:
            raise ValueError("decode='actor' needs the image request the teachers share")
        self.teacher_configs = teachers
        self.allow_random_init = allow_random_init
        self.batch_size = batch_size
        # the engine hands each call several forward batches: the next batch's preparation and the
        # last one's finishing overlap a forward only inside a call
        self.batches_per_call = batches_per_call
        self.cpus = cpus
        self.gpus = gpus
        self.torch_threads = torch_threads
        self.device_preference = device
        self.decode = decode
        self.request = request
        self.max_pixels = max_pixels
        self.teachers: list[Teacher] = []
        #: teacher name -> [seconds from launch to result, images] (what ``labelmill run --dry-run`` times)
        self.teacher_seconds: dict[str, list] = {}
        if decode == "actor":  # the decode stage's job moves in here
            self.requires = (Col.ERROR, Col.WARNINGS, Col.IMAGE_BYTES, Col.CAPTION_BYTES, Col.META_JSON)
            self.produces = (Col.CAPTION, Col.ORIG_H, Col.ORIG_W, *type(self).produces)
            self.drops = (Col.IMAGE_BYTES, Col.IMAGE_EXT, Col.CAPTION_BYTES)

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
        for teacher in self.teachers:
            teacher.apply_gpu_options()
        self.provenance_json = json.dumps(
            {t.name: t.provenance().__dict__ for t in self.teachers}, sort_keys=True
        )
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="label-prepare")
        self._finish_pool = ThreadPoolExecutor(1, thread_name_prefix="label-finish")

    # ------------------------------------------------------------- prepare
    def _prepare(self, rows: list[int], cols: dict, errors, warns) -> _Prepared:
        """Pixels of ``rows`` as an ImageBatch whose canvas is on its way to the device."""
        on_cuda = self.device.type == "cuda"
        with torch.cuda.stream(side_stream(self.device, "h2d")) if on_cuda else contextlib.nullcontext():
            return self._prepare_here(rows, cols, errors, warns)

    def _prepare_here(self, rows: list[int], cols: dict, errors, warns) -> _Prepared:
        if self.decode == "actor":
            images, keep = [], []
            got = decode_batch([cols["blobs"][r] for r in rows], self.request, self.max_pixels, self.device)
            for r, item in zip(rows, got):
                if isinstance(item, ImageDecodeError):
                    errors[r] = str(item)
                    continue
                cols["orig_h"][r], cols["orig_w"][r] = item.orig_hw
                warns[r].extend(item.warnings)
                images.append(item.pixels)
                keep.append(r)
            rows = keep
        else:
            images = [cols["images"][r] for r in rows]
        if not rows:
            return _Prepared(rows, None, None)
        side = max(max(im.shape[0], im.shape[1]) for im in images)
        hosts = None
        if isinstance(images[0], np.ndarray):  # host pixels: fill a (pinned, on CUDA) canvas through numpy
            hosts = images
            canvas = torch.zeros((len(rows), side, side, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            view = canvas.numpy()
            for j, im in enumerate(images):
                view[j, : im.shape[0], : im.shape[1]] = im
        else:  # decoded on the device
            canvas = torch.zeros((len(rows), side, side, 3), dtype=torch.uint8, device=images[0].device)
            for j, im in enumerate(images):
                canvas[j, : im.shape[0], : im.shape[1]] = im
        batch = ImageBatch(
            canvas=canvas,
            work_hw=[(int(im.shape[0]), int(im.shape[1])) for im in images],
            orig_hw=[(int(cols["orig_h"][r]), int(cols["orig_w"][r])) for r in rows],
            captions=[cols["captions"][r] for r in rows],
            keys=[cols["keys"][r] for r in rows],
            metas=[meta_dict(cols["metas"][r]) for r in rows],
            host=hosts,
        )
        return _Prepared(rows, batch, DeviceTensor(canvas, self.device))

    # ------------------------------------------------------------- teachers
    def _run_teacher(self, teacher: Teacher, batch: ImageBatch, upstream, defer: bool):
        """(Pending outputs, per-image failure reasons); ``defer`` lets the result wait on the host copy."""
        try:
            with torch.inference_mode():
                pending = teacher.predict_async(batch, upstream)
            if not defer:
                pending = Pending.ready(self._checked(teacher, batch, pending.result()))
            return pending, [None] * len(batch)
        except Exception as exc:
            return self._one_by_one(teacher, batch, upstream, exc)

    def _checked(self, teacher: Teacher, batch: ImageBatch, outs) -> list:
        if len(outs) != len(batch):
            raise RuntimeError(f"teacher {teacher.name} returned {len(outs)} outputs for {len(batch)} images")
        return list(outs)

    def _one_by_one(self, teacher: Teacher, batch: ImageBatch, upstream, exc: Exception):
        """The batch failed: retry image by image; only images that fail alone become errors."""
        if len(batch) == 1:
            reason = "".join(traceback.format_exception(exc, limit=2)).strip()
            return Pending.ready([None]), [f"teacher {teacher.name} failed: {reason}"]
        batch_failure = f"{type(exc).__name__}: {exc}"
        outs: list[TeacherOutput | None] = []
        errors: list[str | None] = []
        for i in range(len(batch)):
            one_up = {name: [vals[i]] for name, vals in upstream.items()}
            pending, e = self._run_teacher(teacher, batch.subset([i]), one_up, defer=False)
            o = pending.result()
            if o[0] is not None:
                o[0].warnings.append(f"teacher {teacher.name}: batched forward failed ({batch_failure}); labelled alone")
            outs.extend(o)
            errors.extend(e)
        return Pending.ready(outs), errors

    # ---------------------------------------------------------------- batch
    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        todo = [i for i in range(n) if errors[i] is None]
        labels: list[list[dict]] = [[] for _ in range(n)]
        regions: list[list[tuple]] = [[] for _ in range(n)]
        cols = {
            "keys": batch.column(Col.KEY).to_pylist(),
            "metas": batch.column(Col.META_JSON).to_pylist(),
        }
        if self.decode == "actor":
            cols["captions"] = read_captions(batch, warns)
            cols["blobs"] = batch.column(Col.IMAGE_BYTES).to_pylist()
            cols["orig_h"], cols["orig_w"] = [0] * n, [0] * n
        else:
            cols["captions"] = batch.column(Col.CAPTION).to_pylist()
            cols["orig_h"] = batch.column(Col.ORIG_H).to_pylist()
            cols["orig_w"] = batch.column(Col.ORIG_W).to_pylist()
            if todo:
                cols["images"] = batch.column(Col.IMAGE).combine_chunks().to_numpy()
        chunks = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        self._pipeline(chunks, cols, labels, regions, errors, warns)

        out = batch.drop_columns([c for c in self.drops if c in batch.column_names])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        if self.decode == "actor":
            out = out.append_column(Col.CAPTION, pa.array(cols["captions"], pa.string()))
            out = out.append_column(Col.ORIG_H, pa.array(cols["orig_h"], pa.int32()))
            out = out.append_column(Col.ORIG_W, pa.array(cols["orig_w"], pa.int32()))
        out = out.append_column(Col.LABELS, pa.array(labels, pa.list_(LABEL_STRUCT)))
        out = out.append_column(Col.REGIONS, regions_array(regions))
        return out.append_column(Col.PROVENANCE, pa.array([self.provenance_json] * n, pa.string()))

    def _pipeline(self, chunks: list[list[int]], cols, labels, regions, errors, warns) -> None:
        """Prepare chunk i+1 and finish chunk i-1 on helper threads while chunk i runs."""
        if not chunks:
            return
        prepared: Future = self._prepare_pool.submit(self._prepare, chunks[0], cols, errors, warns)
        finishing: list[Future] = []
        for k in range(len(chunks)):
            prep = prepared.result()
            if k + 1 < len(chunks):
                prepared = self._prepare_pool.submit(self._prepare, chunks[k + 1], cols, errors, warns)
            if prep.batch is None:
                continue
            prep.batch.canvas = prep.canvas.get()
            finish = self._forward(prep.batch, prep.rows, errors, warns)
            finishing.append(self._finish_pool.submit(finish, labels, regions, errors, warns))
        for f in finishing:
            f.result()

    def _forward(self, ib: ImageBatch, rows: list[int], errors, warns):
        """Run every teacher on one forward batch; returns the function that finishes it."""
        upstream: dict[str, list[TeacherOutput | None]] = {}
        results: list[tuple[Teacher, list[tuple[list[int], Pending, list]]]] = []
        for t, teacher in enumerate(self.teachers):
            last = t == len(self.teachers) - 1
            idx = list(range(len(rows)))
            if teacher.needs_caption():
                idx = [j for j in idx if ib.captions[j]]
                for j in set(range(len(rows))) - set(idx):
                    warns[rows[j]].append(f"teacher {teacher.name} skipped: no caption")
            size = teacher.config.batch_size or len(idx) or 1
            parts = []
            for s in range(0, len(idx), size):
                part = idx[s : s + size]
                sub = ib if len(part) == len(rows) else ib.subset(part)
                sub_up = {k: [v[j] for j in part] for k, v in upstream.items()}
                t0 = time.perf_counter()
                pending, errs = self._run_teacher(teacher, sub, sub_up, defer=last)
                parts.append((part, pending, errs, sub, sub_up, t0))
            if not last:
                outs: list[TeacherOutput | None] = [None] * len(rows)
                for part, pending, errs, _, _, _ in parts:
                    for j, o in zip(part, pending.result()):
                        outs[j] = o
                upstream[teacher.name] = outs
            results.append((teacher, parts))

        def finish(labels, regions, errors, warns) -> None:
            for teacher, parts in results:
                for part, pending, errs, sub, sub_up, t0 in parts:
                    try:
                        got = self._checked(teacher, sub, pending.result())
                        spent = self.teacher_seconds.setdefault(teacher.name, [0.0, 0])
                        spent[0] += time.perf_counter() - t0
                        spent[1] += len(part)
                    except Exception as exc:  # failed on the host side: redo this part image by image
                        with torch.inference_mode():
                            again, errs = self._one_by_one(teacher, sub, sub_up, exc)
                        got = again.result()
                    for j, out, err in zip(part, got, errs):
                        r = rows[j]
                        if err is not None and errors[r] is None:
                            errors[r] = err
                        if out is None:
                            continue
                        labels[r].extend(label_to_struct(lab, teacher.name) for lab in out.labels)
                        if out.regions is not None:
                            regions[r].append((teacher.name, out.regions))
                        warns[r].extend(out.warnings)
            for r in rows:
                if errors[r] is not None:  # a failed sample keeps no partial labels
                    labels[r] = []
                    regions[r] = []

        return finish
