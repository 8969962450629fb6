"""Infer stage: the run's teachers on the device, in a pool of Ray actors (GPU or CPU).

This process does device work only. ``setup`` builds every teacher once per
actor. Each batch is cut into forward batches of ``batch_size`` images; the
teachers run in config order on the same pixels, each seeing what those
before it produced (``upstream``; a teacher's own ``batch_size`` cuts its
share further). If a teacher raises on a forward batch, the images are
retried one by one and only the ones that still fail get an error row.

Per batch the process does, vectorised (no Python loop over pixels):

* pixels: the batch's decoded images arrive as one flat uint8 buffer (Ray's
  variable-shaped tensor column); one host-to-device copy (pinned, on a copy
  stream) and per-image views, no canvas;
* split teachers (:meth:`~labelmill.teachers.base.Teacher.infer_async`):
  forward, device post-processing and one device-to-host copy of compact
  arrays, emitted as a ``raw.<teacher>`` column
  (:class:`~labelmill.schemas.raw.RawBatch`) for the ``finish`` stage, which
  builds the labels on CPU workers;
* teachers without the split (plug-ins with ``predict`` only) run whole here,
  as before: their label rows are built in this process.

Inside the actor the forward batches run as a three-step pipeline::

    copy batch i+1 to the device     forward batch i         collect batch i-1
    (decode if ray.decode=actor)     (device work queued)    (wait for its one copy back)

Copying and collecting run on one helper thread each, so the device never
waits on this process.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from labelmill.io.images import ImageDecodeError, decode_batch
from labelmill.models.transfer import side_stream
from labelmill.schemas.raw import RawBatch, prepared_column, raw_column
from labelmill.schemas.records import ImageRequest
from labelmill.schemas.tables import LABEL_STRUCT, Col, label_to_struct, meta_dict, regions_array
from labelmill.stages.base import Resources, Stage
from labelmill.stages.prepare import prepared_teachers
from labelmill.teachers.base import ImageBatch, Pending, Teacher, TeacherConfig, build_teacher, upstream_views


def pick_device(preference: str, gpus: float) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and (gpus > 0 or preference == "cuda"):
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("ray.device=cuda but this worker sees no CUDA device")
    return torch.device("cpu")


def host_views(column) -> list[np.ndarray]:
    """Per-row uint8 (h, w, 3) arrays of a variable-shaped tensor column: zero-copy views of its buffers."""
    out = []
    for chunk in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]):
        storage = chunk.storage
        data = storage.field("data")
        offsets = data.offsets.to_numpy()
        flat = data.values.to_numpy(zero_copy_only=False)
        shapes = storage.field("shape").flatten().to_numpy().reshape(-1, 3)
        out += [flat[offsets[i] : offsets[i + 1]].reshape(shapes[i]) for i in range(len(chunk))]
    return out


def to_device(hosts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The images as tensors on ``device``: zero-copy on CPU; on CUDA one pinned buffer, one copy."""
    if device.type != "cuda":
        with warnings.catch_warnings():  # Arrow's buffers are read-only; teachers never write to their pixels
            warnings.simplefilter("ignore", UserWarning)
            return [torch.from_numpy(h) for h in hosts]
    sizes = np.array([h.size for h in hosts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    pinned = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=True)
    np.concatenate([h.reshape(-1) for h in hosts], out=pinned.numpy())
    dev = pinned.to(device, non_blocking=True)  # on the caller's (copy) stream
    return [dev[offsets[i] : offsets[i + 1]].view(*hosts[i].shape) for i in range(len(hosts))]


@dataclass
class _Chunk:
    rows: list[int]  # batch rows of the images in ``batch``
    batch: ImageBatch | None
    prepared: dict[str, list] = field(default_factory=dict)
    ready: "torch.cuda.Event | None" = None  # CUDA: recorded on the copy stream after the chunk's copy

    def wait(self, device: torch.device) -> None:
        """Make the compute stream wait for this chunk's copy (and keep its memory alive for it)."""
        if self.ready is None or self.batch is None:
            return
        stream = torch.cuda.current_stream(device)
        stream.wait_event(self.ready)
        for image in self.batch.images or []:
            image.record_stream(stream)


class InferImages(Stage):
    name = "infer"
    role = "model"
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
        concurrent_calls: int | None = None,
    ):
        if decode not in ("tasks", "actor"):
            raise ValueError(f"decode must be 'tasks' or 'actor', not {decode!r}")
        if decode == "actor" and request is None:
            raise ValueError("decode='actor' needs the image request the teachers share")
        self.teacher_configs = teachers
        self.allow_random_init = allow_random_init
        self.batch_size = batch_size
        # several forward batches per call: the next batch's copy and the last one's collection overlap a
        # forward inside a call; on a GPU plan two calls at once (threads) let one call's last collection and its
        # output overlap the next call's forwards, so the device does not wait between calls (None: the engine
        # decides from the plan). The forwards themselves take turns (one device lock): one device queue.
        self.batches_per_call = batches_per_call
        self.concurrent_calls = concurrent_calls
        self.cpus = cpus
        self.gpus = gpus
        self.torch_threads = torch_threads
        self.device_preference = device
        self.decode = decode
        self.request = request
        self.max_pixels = max_pixels
        self.teachers: list[Teacher] = []
        #: teacher name -> [seconds from launch to raw result, images] (what ``labelmill run --dry-run`` times)
        self.teacher_seconds: dict[str, list] = {}
        self.split_names = [c.instance_name for c in teachers if c.split]
        self.prepared_names = [c.instance_name for c, _ in prepared_teachers(teachers)]
        prep_cols = tuple(prepared_column(n) for n in self.prepared_names)
        raw_cols = tuple(raw_column(n) for n in self.split_names)
        if decode == "actor":  # the bytes are decoded here (nvJPEG on a GPU)
            self.requires = (Col.ERROR, Col.WARNINGS, Col.IMAGE_BYTES, Col.CAPTION, Col.META_JSON, *prep_cols)
            self.produces = (Col.ORIG_H, Col.ORIG_W, Col.LABELS, Col.REGIONS, Col.PROVENANCE, *raw_cols)
            self.drops = (Col.IMAGE_BYTES, Col.IMAGE_EXT)
        else:
            self.requires = (Col.ERROR, Col.WARNINGS, Col.IMAGE, Col.ORIG_H, Col.ORIG_W, Col.CAPTION, Col.META_JSON,
                             *prep_cols)
            self.produces = (Col.LABELS, Col.REGIONS, Col.PROVENANCE, *raw_cols)
            self.drops = (Col.IMAGE,)

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
        # which teachers' results a later teacher reads: those are collected at once, not deferred
        self.read_later = {src.teacher for c in self.teacher_configs for src in getattr(c, "proposals", [])
                           if getattr(src, "teacher", None)}
        self.read_later |= {c.dense_features_from for c in self.teacher_configs
                            if getattr(c, "dense_features_from", None)}
        self._device_lock = threading.Lock()
        self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="infer-copy")
        self._collect_pool = ThreadPoolExecutor(1, thread_name_prefix="infer-collect")

    # ---------------------------------------------------------------- copy
    def _to_device(self, rows: list[int], cols: dict, errors, warns) -> _Chunk:
        """Pixels of ``rows`` as an ImageBatch on the device (one copy of the chunk's flat buffer)."""
        if self.device.type != "cuda":
            return self._to_device_here(rows, cols, errors, warns)
        with torch.cuda.stream(side_stream(self.device, "h2d")):
            chunk = self._to_device_here(rows, cols, errors, warns)
            chunk.ready = torch.cuda.Event()
            chunk.ready.record()
        return chunk

    def _to_device_here(self, rows: list[int], cols: dict, errors, warns) -> _Chunk:
        hosts = None
        if self.decode == "actor":
            images, keep = [], []
            got = decode_batch([cols["blobs"][r] for r in rows], self.request, self.max_pixels, self.device)
            for r, item in zip(rows, got):
                if isinstance(item, ImageDecodeError):
                    errors[r] = str(item)
                    continue
                cols["orig_h"][r], cols["orig_w"][r] = item.orig_hw
                warns[r].extend(item.warnings)
                pixels = item.pixels
                images.append(torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels)
                keep.append(r)
            rows = keep
            if images and self.device.type != "cuda":
                hosts = [im.numpy() for im in images]
        else:
            hosts = [cols["images"][r] for r in rows]
            images = to_device(hosts, self.device)
        if not rows:
            return _Chunk(rows, None)
        batch = ImageBatch(
            canvas=None,
            work_hw=[(int(im.shape[0]), int(im.shape[1])) for im in images],
            orig_hw=[(int(cols["orig_h"][r]), int(cols["orig_w"][r])) for r in rows],
            captions=[cols["captions"][r] for r in rows],
            keys=[cols["keys"][r] for r in rows],
            metas=[meta_dict(cols["metas"][r]) for r in rows],
            host=hosts,
            images=images,
        )
        prepared = {name: [values[r] for r in rows] for name, values in cols["prepared"].items()}
        return _Chunk(rows, batch, prepared)

    # ------------------------------------------------------------- teachers
    def _launch(self, teacher: Teacher, batch: ImageBatch, upstream, prepared, defer: bool):
        """(Pending result, per-image failure reasons). Split teachers give a RawBatch, others outputs."""
        try:
            with torch.inference_mode():
                if teacher.config.split:
                    pending = teacher.infer_async(batch, upstream, prepared)
                else:
                    pending = teacher.predict_async(batch, upstream)
            if not defer:
                pending = Pending.ready(self._checked(teacher, batch, pending.result()))
            return pending, [None] * len(batch)
        except Exception as exc:
            return self._one_by_one(teacher, batch, upstream, prepared, exc)

    def _checked(self, teacher: Teacher, batch: ImageBatch, got):
        n = len(got)
        if n != len(batch):
            raise RuntimeError(f"teacher {teacher.name} returned {n} outputs for {len(batch)} images")
        return got if isinstance(got, RawBatch) else list(got)

    def _one_by_one(self, teacher: Teacher, batch: ImageBatch, upstream, prepared, exc: Exception):
        """The batch failed: retry image by image; only images that fail alone become errors."""
        if len(batch) == 1:
            reason = "".join(traceback.format_exception(exc, limit=2)).strip()
            return Pending.ready(None), [f"teacher {teacher.name} failed: {reason}"]
        batch_failure = f"{type(exc).__name__}: {exc}"
        parts: list = []
        errors: list[str | None] = []
        for i in range(len(batch)):
            one_up = {name: [vals[i]] for name, vals in upstream.items()}
            one_prep = None if prepared is None else [prepared[i]]
            pending, e = self._launch(teacher, batch.subset([i]), one_up, one_prep, defer=False)
            parts.append(pending.result())
            errors.extend(e)
        note = f"teacher {teacher.name}: batched forward failed ({batch_failure}); labelled alone"
        if teacher.config.split:
            ok = [i for i, p in enumerate(parts) if p is not None]
            raw = RawBatch.concat([parts[i] for i in ok]).scatter(ok, len(batch)) if ok else None
            return Pending.ready((raw, note)), errors
        outs = []
        for p in parts:
            o = None if p is None else p[0]
            if o is not None:
                o.warnings.append(note)
            outs.append(o)
        return Pending.ready(outs), errors

    # ---------------------------------------------------------------- batch
    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        todo = [i for i in range(n) if errors[i] is None]
        labels: list[list[dict]] = [[] for _ in range(n)]
        regions: list[list[tuple]] = [[] for _ in range(n)]
        raws: dict[str, list[tuple[list[int], RawBatch]]] = {name: [] for name in self.split_names}
        cols = {
            "keys": batch.column(Col.KEY).to_pylist(),
            "metas": batch.column(Col.META_JSON).to_pylist(),
            "captions": batch.column(Col.CAPTION).to_pylist(),
            "prepared": {name: batch.column(prepared_column(name)).to_pylist() for name in self.prepared_names},
        }
        if self.decode == "actor":
            cols["blobs"] = batch.column(Col.IMAGE_BYTES).to_pylist()
            cols["orig_h"], cols["orig_w"] = [0] * n, [0] * n
        else:
            cols["orig_h"] = batch.column(Col.ORIG_H).to_pylist()
            cols["orig_w"] = batch.column(Col.ORIG_W).to_pylist()
            cols["images"] = host_views(batch.column(Col.IMAGE)) if todo else []
        chunks = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        self._pipeline(chunks, cols, labels, regions, raws, errors, warns)

        out = batch.drop_columns([c for c in self.drops if c in batch.column_names])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        if self.decode == "actor":
            out = out.append_column(Col.ORIG_H, pa.array(cols["orig_h"], pa.int32()))
            out = out.append_column(Col.ORIG_W, pa.array(cols["orig_w"], pa.int32()))
        out = out.append_column(Col.LABELS, pa.array(labels, pa.list_(LABEL_STRUCT)))
        out = out.append_column(Col.REGIONS, regions_array(regions))
        for teacher in self.teachers:
            name = teacher.name
            if name not in raws:
                continue
            raw = assemble(raws[name], n, teacher.host.raw_fields())
            raw.valid &= np.array([e is None for e in errors], dtype=bool)  # a failed sample keeps nothing
            out = out.append_column(raw_column(name), raw.to_arrow())
        return out.append_column(Col.PROVENANCE, pa.array([self.provenance_json] * n, pa.string()))

    def _pipeline(self, chunks: list[list[int]], cols, labels, regions, raws, errors, warns) -> None:
        """Copy chunk i+1 and collect chunk i-1 on helper threads while chunk i runs."""
        if not chunks:
            return
        copied: Future = self._copy_pool.submit(self._to_device, chunks[0], cols, errors, warns)
        collecting: list[Future] = []
        for k in range(len(chunks)):
            chunk = copied.result()
            if k + 1 < len(chunks):
                copied = self._copy_pool.submit(self._to_device, chunks[k + 1], cols, errors, warns)
            if chunk.batch is None:
                continue
            with self._device_lock:
                chunk.wait(self.device)
                collect = self._forward(chunk, errors, warns)
            collecting.append(self._collect_pool.submit(collect, labels, regions, raws, errors, warns))
        for f in collecting:
            f.result()

    def _forward(self, chunk: _Chunk, errors, warns):
        """Run every teacher on one forward batch; returns the function that collects its results."""
        ib, rows = chunk.batch, chunk.rows
        upstream: dict[str, list] = {}
        results = []
        for t, teacher in enumerate(self.teachers):
            later = t < len(self.teachers) - 1 and teacher.name in self.read_later
            idx = list(range(len(rows)))
            if teacher.needs_caption():
                idx = [j for j in idx if ib.captions[j]]
                for j in set(range(len(rows))) - set(idx):
                    warns[rows[j]].append(f"teacher {teacher.name} skipped: no caption")
            size = teacher.config.batch_size or len(idx) or 1
            prepared = chunk.prepared.get(teacher.name)
            parts = []
            for s in range(0, len(idx), size):
                part = idx[s : s + size]
                sub = ib if len(part) == len(rows) else ib.subset(part)
                sub_up = {k: [v[j] for j in part] for k, v in upstream.items()}
                sub_prep = None if prepared is None else [prepared[j] for j in part]
                t0 = time.perf_counter()
                pending, errs = self._launch(teacher, sub, sub_up, sub_prep, defer=not later)
                parts.append((part, pending, errs, t0))
            if later:  # a later teacher reads these results now
                seen: list = [None] * len(rows)
                for part, pending, _, _ in parts:
                    got = pending.result()
                    if teacher.config.split:
                        got = _raw_of(got)[0]
                        got = [None] * len(part) if got is None else upstream_views(
                            teacher.host, got, [ib.orig_hw[j] for j in part])
                    for j, o in zip(part, got):
                        seen[j] = o
                upstream[teacher.name] = seen
            results.append((teacher, parts))

        def collect(labels, regions, raws, errors, warns) -> None:
            for teacher, parts in results:
                for part, pending, errs, t0 in parts:
                    got = pending.result()
                    spent = self.teacher_seconds.setdefault(teacher.name, [0.0, 0])
                    spent[0] += time.perf_counter() - t0
                    spent[1] += len(part)
                    for j, err in zip(part, errs):
                        if err is not None and errors[rows[j]] is None:
                            errors[rows[j]] = err
                    if teacher.config.split:
                        raw, note = _raw_of(got)
                        if raw is None:
                            continue
                        if note:
                            for j, err in zip(part, errs):
                                if err is None:
                                    warns[rows[j]].append(note)
                        raws[teacher.name].append(([rows[j] for j in part], raw))
                        continue
                    for j, out in zip(part, got or [None] * len(part)):
                        if out is None:
                            continue
                        r = rows[j]
                        labels[r].extend(label_to_struct(lab, teacher.name) for lab in out.labels)
                        if out.regions is not None:
                            regions[r].append((teacher.name, out.regions))
                        warns[r].extend(out.warnings)
            for r in rows:
                if errors[r] is not None:  # a failed sample keeps no partial labels
                    labels[r] = []
                    regions[r] = []

        return collect


def _raw_of(got) -> tuple[RawBatch | None, str | None]:
    """A split teacher's result: a RawBatch, or (RawBatch, note) after an image-by-image retry."""
    if isinstance(got, tuple):
        return got
    return got, None


def assemble(parts: list[tuple[list[int], RawBatch]], n: int, layout: dict[str, tuple]) -> RawBatch:
    """One RawBatch over a batch's ``n`` rows from the parts' results (rows ascending across parts)."""
    parts = sorted((p for p in parts if p[0]), key=lambda p: p[0][0])
    if not parts:
        return RawBatch.empty(layout, n)
    rows = [r for part_rows, _ in parts for r in part_rows]
    raw = RawBatch.concat([raw for _, raw in parts]).scatter(rows, n)
    if set(raw.arrays) != set(layout):
        raise RuntimeError(f"raw results with fields {sorted(raw.arrays)}, the host side declares {sorted(layout)}")
    return raw
