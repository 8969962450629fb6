"""Prepare stage (CPU pool): what the device will need, computed on the host.

Runs as Ray CPU tasks, fused after the reader:

* images are decoded once, at the largest working size any teacher asks
  for (:class:`~labelmill.schemas.records.ImageRequest`), unless
  ``ray.decode: actor`` sends the raw bytes to the device process (nvJPEG);
* captions are decoded (bad UTF-8 and missing captions become warnings);
* every split teacher's host side computes its per-image inputs (GLIP in
  caption mode: noun phrases and tokens), one ``prep.<teacher>`` column each.

A sample that cannot be decoded keeps flowing with its ``error`` set and a
1x1 placeholder image, so it is still counted and written.  Nothing here
imports torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelmill.io.images import ImageDecodeError, decode_caption, decode_image
from labelmill.schemas.raw import prepared_column
from labelmill.schemas.records import ImageRequest
from labelmill.schemas.tables import Col, meta_dict
from labelmill.stages.base import Resources, Stage

PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)
#: longest side assumed for a decoded row in the object-store budget (photos at original size)
ROW_SIDE_CAP = 2048


def read_captions(batch: pa.Table, warns: list[list[str]]) -> list[str | None]:
    """Decoded captions of a batch's rows; caption warnings go to ``warns``."""
    captions: list[str | None] = []
    for i, raw in enumerate(batch.column(Col.CAPTION_BYTES).to_pylist()):
        caption, notes = decode_caption(raw)
        warns[i].extend(notes)
        captions.append(caption)
    return captions


def merge_requests(requests: list[ImageRequest]) -> ImageRequest:
    """The request that satisfies all of ``requests`` (largest on both axes)."""
    return ImageRequest(
        short_side=max(r.short_side for r in requests),
        max_long_side=max(r.max_long_side for r in requests),
    )


def prepared_teachers(teachers) -> list:
    """The split teachers that prepare per-image inputs on the host, with their host sides."""
    from labelmill.teachers.base import host_side

    out = []
    for cfg in teachers:
        host = host_side(cfg)
        if host is not None and host.prepared_type() is not None:
            out.append((cfg, host))
    return out


class PrepareInputs(Stage):
    name = "prepare"
    requires = (Col.IMAGE_BYTES, Col.CAPTION_BYTES, Col.ERROR, Col.WARNINGS, Col.META_JSON)

    def __init__(self, request: ImageRequest, max_pixels: int, *, teachers=(), decode: bool = True,
                 cpus: float = 0.25):
        self.request = request
        self.max_pixels = max_pixels
        self.teacher_configs = list(teachers)
        self.decode = decode
        self.cpus = cpus
        names = [prepared_column(cfg.instance_name) for cfg, _ in prepared_teachers(self.teacher_configs)]
        if decode:
            self.produces = (Col.IMAGE, Col.ORIG_H, Col.ORIG_W, Col.CAPTION, *names)
            self.drops = (Col.IMAGE_BYTES, Col.IMAGE_EXT, Col.CAPTION_BYTES)
        else:  # the device process decodes the bytes (nvJPEG)
            self.produces = (Col.CAPTION, *names)
            self.drops = (Col.CAPTION_BYTES,)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def bytes_per_row(self) -> int:
        """A decoded row's size for the object-store budget: the request's square, at most 2048 x 2048 (a
        request for the original resolution would otherwise make the budget unbounded)."""
        side = min(self.request.max_long_side, ROW_SIDE_CAP)
        return side * side * 3

    def process_batch(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        captions = read_captions(batch, warns)
        out = batch
        if self.decode:
            images, orig_h, orig_w = self._decode(batch.column(Col.IMAGE_BYTES).to_pylist(), errors, warns)
        prepared = []
        if any(True for _ in prepared_teachers(self.teacher_configs)):
            metas = [meta_dict(m) for m in batch.column(Col.META_JSON).to_pylist()]
            for cfg, host in prepared_teachers(self.teacher_configs):
                values = host.prepare([c if e is None else None for c, e in zip(captions, errors)], metas)
                prepared.append((prepared_column(cfg.instance_name), pa.array(values, host.prepared_type())))
        out = out.drop_columns([c for c in self.drops if c in out.column_names])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        out = out.append_column(Col.CAPTION, pa.array(captions, pa.string()))
        for name, values in prepared:
            out = out.append_column(name, values)
        if not self.decode:
            return out
        out = out.append_column(Col.ORIG_H, pa.array(orig_h, pa.int32()))
        out = out.append_column(Col.ORIG_W, pa.array(orig_w, pa.int32()))
        from ray.data.extensions import ArrowVariableShapedTensorArray  # Ray's tensor column type

        return out.append_column(Col.IMAGE, ArrowVariableShapedTensorArray.from_numpy(images))

    def _decode(self, blobs: list, errors: list, warns: list):
        images, orig_h, orig_w = [], [], []
        for i, blob in enumerate(blobs):
            pixels, hw = PLACEHOLDER, (0, 0)
            if errors[i] is None:
                try:
                    decoded = decode_image(blob, self.request, self.max_pixels)
                    pixels, hw = decoded.pixels, decoded.orig_hw
                    warns[i].extend(decoded.warnings)
                except ImageDecodeError as exc:
                    errors[i] = str(exc)
            images.append(pixels)
            orig_h.append(hw[0])
            orig_w.append(hw[1])
        return images, orig_h, orig_w
