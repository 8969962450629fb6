"""A FiftyOne-loadable dataset: FiftyOne's ``COCODetectionDataset`` layout, one labels file per teacher.

``labelmill export-fiftyone OUTPUT DEST`` writes::

    DEST/data/<file_name>          images, linked or copied from the shards (--images none: use your own folder)
    DEST/labels/<teacher>.json     COCO detections: bbox, RLE mask (``segmentation``), ``score``
    DEST/manifest.json

which ``fiftyone.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset,
data_path=DEST/data, labels_path=DEST/labels/<teacher>.json,
label_types=["segmentations"], label_field=<teacher>)`` loads: each label
becomes a ``Detection`` with its instance mask and ``confidence`` = score
(see the README's *Exports* section).  Category ids follow
:mod:`labelmill.export.categories`, ``file_name`` is the image's real name.

A teacher with phrase-only grounding boxes (GLIP in caption mode) gets the
same file, MDETR-shaped: one ``object`` category, and per box its ``phrase``
and ``tokens_positive``, which FiftyOne loads as attributes of each
``Detection`` (``det.phrase``); each image carries its ``caption``.
"""

from __future__ import annotations

import posixpath
from typing import Any

from labelmill.export.base import (
    Destination, ExportOptionError, ExportSource, ImageSink, Sample, Writer, register, select_teachers,
)
from labelmill.export.coco import GroundingByTeacher, InstancesByTeacher


@register("fiftyone")
class FiftyOneWriter(Writer):
    def __init__(self, dest: Destination, source: ExportSource, *, teachers: list[str] | None = None,
                 classes: list[str] | None = None, category_ids: str | dict | None = None, images: str = "copy",
                 image_cache: str | None = None):
        super().__init__(dest, source)
        catalog = source.catalog()
        wanted = select_teachers(source, teachers)
        files = {t: posixpath.join("labels", f"{t}.json") for t in wanted}
        with_classes = [t for t in wanted if catalog[t].classes]
        phrases_only = [t for t in wanted if not catalog[t].classes and catalog[t].grounding]
        if not with_classes and not phrases_only:
            raise ExportOptionError(f"no box or mask labels from teacher(s) {wanted} in version {source.version} "
                                    f"of {source.output}")
        self.instances = InstancesByTeacher(dest, source, with_classes, classes, category_ids, None, files)
        self.grounding = GroundingByTeacher(dest, source, phrases_only, None, files)
        self.images = ImageSink(dest, images, "data", image_cache)
        self.wants_image_bytes = self.images.wants_bytes

    def add(self, sample: Sample) -> None:
        self.instances.add(sample)
        self.grounding.add(sample)
        self.images.put(sample)

    def close(self) -> dict[str, Any]:
        labels = {t: names[0] for t, names in self.instances.close().items() if names}
        grounding = {t: names[0] for t, names in self.grounding.close().items() if names}
        return {"labels": {**labels, **grounding}, "grounding_labels": sorted(grounding), "data_path": "data",
                "images_folder": self.images.report(), "categories": self.instances.categories}
