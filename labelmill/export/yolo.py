"""Ultralytics (YOLO) detection and segmentation datasets.

``labelmill export-yolo OUTPUT DEST`` writes::

    DEST/data.yaml                 names {0: class, ...}: every class of the output; train/val folders
    DEST/images/{train,val}/<file_name>   the images, linked or copied from the shards (--images)
    DEST/labels/{train,val}/<stem>.txt    one line per label, coordinates normalised to [0, 1]
    DEST/manifest.json

Class numbers come from the output's class registry
(:mod:`labelmill.store.classes`): a class has the same number in every
version's export and with any ``--classes`` (which only leaves other classes'
labels out).  An image's split is fixed by its key (``--val-fraction``, a hash
of the key), so it stays in the same split in every version; when no image
falls in val, val is the train folder (said in the manifest).

``--task detect`` lines are ``cls cx cy w h``; ``--task segment`` lines are
``cls x1 y1 x2 y2 ...``: the stored RLE mask's outline through its boundary
pixels' centres (:mod:`labelmill.export.polygons`), which OpenCV's
``fillPoly`` (Ultralytics, supervision) fills back to the mask exactly for a
one-part mask (holes filled; the parts of a multi-part mask are joined by
one-pixel bridge lines); a box-only label becomes its rectangle.  Every exported image has a label file (empty when it has no
labels: a background image).  Labels are those of one teacher (``--teacher``,
needed when several have class labels); phrase-only grounding labels have no
class and are left out, and a teacher with only those (GLIP in caption mode)
is refused with the exports that take them named.  ``data.yaml`` has no ``path`` key, so Ultralytics
resolves the folders next to the file and the dataset can be moved.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import numpy as np

from labelmill.export.base import (
    Destination, ExportOptionError, ExportSource, ImageSink, Sample, Writer, register, select_classes,
    select_teachers,
)
from labelmill.export.polygons import box_polygon, mask_polygon

TASKS = ("detect", "segment")

#: polygon vertices sit this far right/down of the boundary pixels' centres, so a reader that truncates
#: coordinates to pixels (Ultralytics' ``polygon2mask``) and one that rounds them both land on that pixel
CENTRE_NUDGE = 0.25


def label_path(file_name: str, split: str = "") -> str:
    stem, dot, ext = file_name.rpartition(".")
    base = stem if dot and "/" not in ext else file_name
    return posixpath.join("labels", split, base + ".txt")


def split_of(key: str, val_fraction: float) -> str:
    """``train`` or ``val``, from a hash of the sample key: the same in every version."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return "val" if h < val_fraction else "train"


def detect_line(cls: int, bbox, width: int, height: int) -> str:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, width), min(y + h, height)
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return f"{cls} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


def segment_line(cls: int, polygon: np.ndarray, width: int, height: int) -> str:
    norm = np.clip(polygon / [width, height], 0.0, 1.0)
    return f"{cls} " + " ".join(f"{v:.6f}" for v in norm.reshape(-1))


@register("yolo")
class YoloWriter(Writer):
    def __init__(self, dest: Destination, source: ExportSource, *, task: str = "detect",
                 classes: list[str] | None = None, teacher: str | None = None, images: str = "copy",
                 image_cache: str | None = None, val_fraction: float = 0.1):
        super().__init__(dest, source)
        if task not in TASKS:
            raise ExportOptionError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ExportOptionError(f"--val-fraction must be in [0, 1), not {val_fraction}")
        self.task = task
        self.val_fraction = val_fraction
        catalog = source.catalog()
        if teacher:
            select_teachers(source, [teacher])
            if not catalog[teacher].classes:
                raise ExportOptionError(
                    f"teacher {teacher!r} has phrase-only grounding labels (no class ids) in version "
                    f"{source.version} of {source.output}; YOLO needs classes: run it in vocabulary mode "
                    "(glip mode: vocabulary), or export its boxes with export-coco, export-odvg or export-fiftyone")
        with_classes = select_teachers(source, [teacher] if teacher else None, need_classes=True)
        if not with_classes:
            raise ExportOptionError(f"version {source.version} of {source.output} has no class labels to export "
                                    "(YOLO needs class ids; phrase-only grounding labels have none: use "
                                    "export-coco, export-odvg or export-fiftyone for those)")
        if len(with_classes) > 1:
            raise ExportOptionError(f"labels of several teachers {with_classes}: choose one with --teacher")
        self.teacher = with_classes[0]
        self.exported = set(select_classes(source, classes))
        registry = source.registry()
        self.names = registry.names()
        self.index = {n: registry.index(n) for n in self.names if n in self.exported}
        self.images = ImageSink(dest, images, "images", image_cache)
        self.splits = {"train": 0, "val": 0}
        self.wants_image_bytes = self.images.wants_bytes
        self.counts = {"labels": 0, "boxes_as_polygons": 0, "left_out_other_classes": 0, "left_out_phrases": 0}

    def add(self, sample: Sample) -> None:
        lines = []
        for row in sample.labels:
            if row["teacher"] != self.teacher:
                continue
            if row["class_id"] is None or row["class_name"] is None:
                self.counts["left_out_phrases"] += 1
                continue
            cls = self.index.get(row["class_name"])
            if cls is None:
                self.counts["left_out_other_classes"] += 1
                continue
            if self.task == "detect":
                lines.append(detect_line(cls, row["bbox"], sample.width, sample.height))
            else:
                seg = row.get("segmentation")
                if seg is not None:
                    poly = mask_polygon(seg, at="centres") + CENTRE_NUDGE
                else:
                    poly = box_polygon(row["bbox"])
                    self.counts["boxes_as_polygons"] += 1
                if len(poly) < 3:
                    continue
                lines.append(segment_line(cls, poly, sample.width, sample.height))
        self.counts["labels"] += len(lines)
        text = "\n".join(lines) + ("\n" if lines else "")
        split = split_of(sample.key, self.val_fraction)
        self.splits[split] += 1
        self.dest.create(label_path(sample.file_name, split), text.encode(), "label file")
        self.images.put(sample, split)

    def close(self) -> dict[str, Any]:
        import yaml

        val = "images/val" if self.splits["val"] else "images/train"
        doc = {"train": "images/train", "val": val, "names": dict(enumerate(self.names))}
        with self.dest.open("data.yaml", "w") as fh:
            fh.write(f"# labelmill pseudo-labels: {self.source.output} version {self.source.version}, "
                     f"teacher {self.teacher}, task {self.task}\n")
            yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True)
        return {"task": self.task, "teacher": self.teacher, "names": self.names, "data_yaml": "data.yaml",
                "exported_classes": [n for n in self.names if n in self.exported], "splits": self.splits,
                "val_is_train": not self.splits["val"],
                "images_folder": self.images.report(), **self.counts}
