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
from labelmill.export.coco import GroundingByTeacher


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
