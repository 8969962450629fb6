"""ODVG export: the JSONL format GroundingDINO-style trainers read (mmdet's ``ODVGDataset``, Open-GroundingDino).

``labelmill export-odvg OUTPUT DEST`` writes::

    DEST/grounding.jsonl   (--mode grounding) or DEST/detection.jsonl (--mode detection)
    DEST/label_map.json    detection mode: {"0": class, "1": class, ...}
    DEST/images/<file_name>  the images of the lines written (--images link|copy|none)
    DEST/manifest.json

One line per image with at least one box (a box label, or a mask label's box) at
``--threshold``:

* grounding (phrase labels of a caption, e.g. GLIP in caption mode)::

    {"filename": "0000-astronaut.png", "height": H, "width": W,
     "grounding": {"caption": "...", "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "...",
                                                  "tokens_positive": [[s, e]], "score": 0.7}]}}

* detection (class labels)::

    {"filename": ..., "height": H, "width": W,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "car", "score": 0.7}]}}

``filename`` is the image's name relative to ``DEST/images`` (the name it has
in its shard, extension included), so ``data_prefix=dict(img="DEST/images/")``
finds it.  ``label`` numbers come from the output's class registry
(:mod:`labelmill.store.classes`, the same numbers as YOLO's): a class keeps
its number in every version and with any ``--classes``; ``label_map.json``
lists every class of the output.  Boxes are corner coordinates: ``x2 = x + w``
of the stored COCO box.  ``key`` and ``shard`` say where each image came from
(``shard`` relative to the manifest's ``shard_root``).
"""

from __future__ import annotations

import json
from typing import Any

from labelmill.export.base import (
    Destination, ExportOptionError, ExportSource, ImageSink, Sample, Writer, register, select_classes,
    select_teachers,
)

MODES = ("grounding", "detection")


def corners(bbox) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)]


@register("odvg")
class OdvgWriter(Writer):
    def __init__(self, dest: Destination, source: ExportSource, *, mode: str | None = None,
                 teacher: str | None = None, classes: list[str] | None = None, threshold: float = 0.0,
                 images: str = "copy", image_cache: str | None = None):
        super().__init__(dest, source)
        if mode is not None and mode not in MODES:
            raise ExportOptionError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        catalog = source.catalog()
        asked = select_teachers(source, [teacher] if teacher else None)
        if mode is None:  # grounding where some teacher grounds phrases, else detection
            mode = "grounding" if any(catalog[t].grounding for t in asked) else "detection"
        fits = [t for t in asked if (catalog[t].grounding if mode == "grounding" else catalog[t].classes)]
        what = "phrase (grounding) labels with a caption" if mode == "grounding" else "class labels"
        if not fits:
            other = "detection" if mode == "grounding" else "grounding"
            raise ExportOptionError(f"no {what} from teacher(s) {asked} in version {source.version} of "
                                    f"{source.output}; try --mode {other}")
        if len(fits) > 1:
            raise ExportOptionError(f"{what} from several teachers {fits}: choose one with --teacher")
        if classes and mode == "grounding":
            raise ExportOptionError("--classes applies to --mode detection (grounding labels are phrases)")
        self.mode, self.teacher, self.threshold = mode, fits[0], float(threshold)
        registry = source.registry()
        self.names = registry.names()
        self.label_of = {n: registry.index(n) for n in select_classes(source, classes)} if mode == "detection" \
            else {}
        self.file = f"{mode}.jsonl"
        self._fh = dest.open(self.file, "w")
        self.images = ImageSink(dest, images, "images", image_cache)
        self.wants_image_bytes = self.images.wants_bytes
        self.counts = {"images": 0, "regions": 0, "images_without_boxes": 0}

    def _record(self, sample: Sample) -> dict[str, Any] | None:
        rows = [r for r in sample.labels if r["teacher"] == self.teacher and r["bbox"] is not None
                and (r["score"] or 0.0) >= self.threshold]
        head = {"filename": sample.file_name, "height": sample.height, "width": sample.width}
        if self.mode == "grounding":
            if sample.caption is None:
                return None
            regions = [{"bbox": corners(r["bbox"]), "phrase": r["phrase"],
                        "tokens_positive": [[int(a), int(b)] for a, b in r["tokens_positive"]],
                        "score": round(float(r["score"]), 5)}
                       for r in rows if r["phrase"] is not None and r["tokens_positive"]]
            body = {"grounding": {"caption": sample.caption, "regions": regions}} if regions else None
            n = len(regions)
        else:
            instances = [{"bbox": corners(r["bbox"]), "label": self.label_of[r["class_name"]],
                          "category": r["class_name"], "score": round(float(r["score"]), 5)}
                         for r in rows if r["class_id"] is not None and r["class_name"] in self.label_of]
            body = {"detection": {"instances": instances}} if instances else None
            n = len(instances)
        if body is None:
            return None
        self.counts["regions"] += n
        return {**head, **body, "key": sample.key, "shard": sample.shard_name or sample.shard}

    def add(self, sample: Sample) -> None:
        record = self._record(sample)
        if record is None:
            self.counts["images_without_boxes"] += 1
            return
        self._fh.write(json.dumps(record) + "\n")
        self.counts["images"] += 1
        self.images.put(sample)

    def close(self) -> dict[str, Any]:
        self._fh.close()
        files = {"annotations": self.file}
        if self.mode == "detection":
            with self.dest.open("label_map.json", "w") as fh:
                json.dump({str(i): n for i, n in enumerate(self.names)}, fh, indent=1)
            files["label_map"] = "label_map.json"
        if self.counts["images"] == 0:
            from labelmill.export.base import NothingToExport

            raise NothingToExport(f"no {self.teacher} box of version {self.source.version} of {self.source.output} "
                                  f"has a score >= {self.threshold}: nothing to export")
        return {"mode": self.mode, "teacher": self.teacher, "threshold": self.threshold, "files": files,
                "images_folder": self.images.report(), **self.counts,
                **({"names": self.names} if self.mode == "detection" else {})}


def export_odvg(output: str, dest: str, *, version: int | str | None = None, teacher: str | None = None,
                mode: str | None = None, threshold: float = 0.0, images: str = "copy", overwrite: bool = False,
                storage_options: dict | None = None) -> dict[str, Any]:
    """Write the ODVG export of version ``version`` (default: latest) of ``output`` into the folder ``dest``."""
    from labelmill.export.base import run_export

    return run_export("odvg", output, dest, version=version, overwrite=overwrite, storage_options=storage_options,
                      teacher=teacher, mode=mode, threshold=threshold, images=images)
