"""MDETR/GLIP-style grounding files: every image carries its ``caption``, every box its phrase spans.

For teachers that ground caption phrases (labels with a ``phrase`` and no
class id, i.e. GLIP in caption mode): ``<teacher>/grounding_00000.json, ...``,
COCO-shaped (one ``object`` category) so ``pycocotools`` loads them, with
``caption`` per image and ``phrase`` and ``tokens_positive`` (character spans
into the caption) per annotation.  Only images with a caption are written.
"""

from __future__ import annotations

from typing import Any

from labelmill.export.base import Destination, ExportSource, Sample, Writer, register, select_teachers
from labelmill.export.coco import ShardedCoco, box_fields, image_entry

GROUNDING_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def grounding_annotation(row: dict, image_id: int) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": 1, **box_fields(row), "phrase": row["phrase"],
            "tokens_positive": [[int(a), int(b)] for a, b in (row["tokens_positive"] or [])]}


class GroundingByTeacher:
    def __init__(self, dest: Destination, source: ExportSource, teachers: list[str], images_per_file: int | None):
        catalog = source.catalog()
        self.files = {
            t: ShardedCoco(dest, t, "grounding", [GROUNDING_CATEGORY], images_per_file,
                           f"labelmill grounding ({t}, version {source.version})")
            for t in teachers if catalog[t].grounding
        }

    def add(self, sample: Sample) -> None:
        if sample.caption is None:
            return
        image = image_entry(sample)
        for t, out in self.files.items():
            anns = [grounding_annotation(r, sample.image_id) for r in sample.labels
                    if r["teacher"] == t and r["phrase"] is not None and r["class_id"] is None]
            out.add(dict(image), anns)

    def close(self) -> dict[str, list[str]]:
        return {t: w.close() for t, w in self.files.items()}


@register("mdetr")
class MdetrWriter(Writer):
    """Grounding files only (``export-coco`` writes them next to the instances files too)."""

    def __init__(self, dest: Destination, source: ExportSource, *, teachers: list[str] | None = None,
                 images_per_file: int = 50_000):
        super().__init__(dest, source)
        self.grounding = GroundingByTeacher(dest, source, select_teachers(source, teachers), images_per_file)

    def add(self, sample: Sample) -> None:
        self.grounding.add(sample)

    def close(self) -> dict[str, Any]:
        return {"files": {t: {"grounding": names} for t, names in self.grounding.close().items()}}
