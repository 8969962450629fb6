"""Decode stage: encoded bytes -> RGB pixels at the teachers' working size.

Runs as Ray CPU tasks.  Every teacher of the run states the resolution it
needs (:class:`~labelmill.teachers.base.ImageRequest`); images are decoded
once, at the largest of those, so several teachers share one decode.  A
sample that cannot be decoded keeps flowing with its ``error`` set and a
1x1 placeholder image, so it is still counted and written.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelmill.io.images import ImageDecodeError, decode_caption, decode_image
from labelmill.schemas.tables import Col
from labelmill.schemas.records import ImageRequest
from labelmill.stages.base import Resources, Stage

PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)


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


class DecodeImages(Stage):
    name = "decode"
    requires = (Col.IMAGE_BYTES, Col.CAPTION_BYTES, Col.ERROR, Col.WARNINGS)
    produces = (Col.IMAGE, Col.ORIG_H, Col.ORIG_W, Col.CAPTION)
    drops = (Col.IMAGE_BYTES, Col.IMAGE_EXT, Col.CAPTION_BYTES)

    def __init__(self, request: ImageRequest, max_pixels: int, cpus: float = 0.25):
        self.request = request
        self.max_pixels = max_pixels
        self.cpus = cpus

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def bytes_per_row(self) -> int:
        return self.request.max_long_side * self.request.max_long_side * 3

    def process_batch(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        blobs = batch.column(Col.IMAGE_BYTES).to_pylist()
        captions = read_captions(batch, warns)
        images, orig_h, orig_w = [], [], []
        for i in range(batch.num_rows):
            pixels, hw = PLACEHOLDER, (0, 0)
            if errors[i] is None:
                try:
                    decoded = decode_image(blobs[i], self.request, self.max_pixels)
                    pixels, hw = decoded.pixels, decoded.orig_hw
                    warns[i].extend(decoded.warnings)
                except ImageDecodeError as exc:
                    errors[i] = str(exc)
            images.append(pixels)
            orig_h.append(hw[0])
            orig_w.append(hw[1])
        out = batch.drop_columns([c for c in self.drops if c in batch.column_names])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        out = out.append_column(Col.CAPTION, pa.array(captions, pa.string()))
        out = out.append_column(Col.ORIG_H, pa.array(orig_h, pa.int32()))
        out = out.append_column(Col.ORIG_W, pa.array(orig_w, pa.int32()))
        from ray.data.extensions import ArrowVariableShapedTensorArray  # Ray's tensor column type

        return out.append_column(Col.IMAGE, ArrowVariableShapedTensorArray.from_numpy(images))
