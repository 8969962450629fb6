"""COCO ``instances`` export (plus MDETR grounding files), from a pinned version, streamed.

``labelmill export-coco OUTPUT DEST`` writes, for each teacher:

* ``<teacher>/instances_00000.json, ...``: COCO files (``images``,
  ``annotations`` with ``bbox``, ``area``, ``score``, ``iscrowd`` and, for
  masks, an RLE ``segmentation``; ``categories``) of at most
  ``images_per_file`` images each, which ``pycocotools.coco.COCO`` loads;
* for grounding teachers (GLIP in caption mode) ``grounding_00000.json, ...``
  in the MDETR style (see :mod:`labelmill.export.mdetr`).

Category ids are the ones users already have and never move between versions
(:mod:`labelmill.export.categories`): official COCO / COCO-Stuff ids for their
classes, 1001.. for others, or a map passed with ``--category-ids``; every file
lists all the output's classes (or those of ``--classes``), labelled or not.
``file_name`` is the image's name as it appears in the shard (``KEY.ext``), so
the export joins to a folder of the original images; ``shard`` and ``index``
say where the image lives (a name an earlier shard already used becomes
``<shard stem>/<name>``, so no two images share one).  ``iscrowd`` comes from
the label.  Image ids run 1.. in (shard, index) order.
Samples that failed are left out; samples without labels are images without
annotations.  Every JSON file is written as a stream (annotations spool to a
temporary file), so memory does not grow with the number of images.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from typing import Any

from labelmill.export.base import (
    Destination, ExportSource, Sample, Writer, register, run_export, select_classes,
    select_teachers,
)
from labelmill.export.categories import categories_for, load_category_ids


class CocoJsonStream:
    """A COCO JSON file written incrementally: images go straight out, annotations spool to a temp file."""

    def __init__(self, dest: Destination, rel: str, categories: list[dict], description: str):
        self.rel = rel
        self._fh = dest.open(rel, "w")
        self._fh.write('{"info": ' + json.dumps({"description": description}) + ', "licenses": [], '
                       '"categories": ' + json.dumps(categories) + ', "images": [')
        self._spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.images = 0
        self.annotations = 0

    def add(self, image: dict, annotations: list[dict]) -> None:
        self._fh.write((", " if self.images else "") + json.dumps(image))
        self.images += 1
        for ann in annotations:
            self._spool.write((", " if self.annotations else "") + json.dumps(ann))
            self.annotations += 1

    def close(self) -> None:
        self._fh.write('], "annotations": [')
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self._fh)
        self._spool.close()
        self._fh.write("]}")
        self._fh.close()


class ShardedCoco:
    """``<folder>/<stem>_00000.json, ...``: a new file every ``images_per_file`` images (None: one file)."""

    def __init__(self, dest: Destination, folder: str, stem: str, categories: list[dict],
                 images_per_file: int | None, description: str, single_name: str | None = None):
        self.dest, self.folder, self.stem = dest, folder, stem
        self.categories, self.images_per_file = categories, images_per_file
        self.description, self.single_name = description, single_name
        self.files: list[str] = []
        self._current: CocoJsonStream | None = None
        self._next_ann = 1

    def add(self, image: dict, annotations: list[dict]) -> None:
        if self._current is None:
            if self.single_name is not None:
                name = self.single_name
            else:
                name = posixpath.join(self.folder, f"{self.stem}_{len(self.files):05d}.json")
            self._current = CocoJsonStream(self.dest, name, self.categories, self.description)
            self.files.append(name)
        for ann in annotations:
            ann["id"] = self._next_ann
            self._next_ann += 1
        self._current.add(image, annotations)
        if self.images_per_file and self._current.images >= self.images_per_file:
            self.close()

    def close(self) -> list[str]:
        if self._current is not None:
            self._current.close()
            self._current = None
        return self.files


def image_entry(sample: Sample) -> dict[str, Any]:
    image = {"id": sample.image_id, "file_name": sample.file_name, "width": sample.width, "height": sample.height,
             "shard": sample.shard, "key": sample.key, "index": sample.index}
    if sample.caption is not None:
        image["caption"] = sample.caption
    return image


def box_fields(row: dict) -> dict[str, Any]:
    return {"bbox": [round(float(v), 2) for v in row["bbox"]], "area": float(row["area"] or 0.0),
            "score": round(float(row["score"]), 5),
            "iscrowd": int(bool(row.get("iscrowd")))}  # absent in outputs written before labels had it


def instance_annotation(row: dict, image_id: int, category_id: int) -> dict[str, Any]:
    ann = {"image_id": image_id, "category_id": category_id, **box_fields(row)}
    seg = row.get("segmentation")
    if seg is not None:
        ann["segmentation"] = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
    return ann


class InstancesByTeacher:
    """Per teacher: the categories (ids users already have) and the instance files being written."""

    def __init__(self, dest: Destination, source: ExportSource, teachers: list[str] | None,
                 classes: list[str] | None, category_ids: str | dict | None, images_per_file: int | None,
                 file_for: dict[str, str] | None = None):
        id_map = load_category_ids(category_ids) if isinstance(category_ids, str) else category_ids
        catalog = source.catalog()
        asked = [] if teachers is not None and not teachers else select_teachers(source, teachers)
        self.teachers = [t for t in asked if catalog[t].classes]
        names = select_classes(source, classes)
        cats = categories_for(source.registry(), names, id_map)
        self.cat_ids: dict[str, dict[str, int]] = {}
        self.files: dict[str, ShardedCoco] = {}
        self.categories: dict[str, list[dict]] = {}
        for t in self.teachers:
            self.categories[t] = cats
            self.cat_ids[t] = {c["name"]: c["id"] for c in cats}
            single = file_for.get(t) if file_for else None
            self.files[t] = ShardedCoco(dest, t, "instances", cats, images_per_file,
                                        f"labelmill pseudo-labels ({t}, version {source.version})", single)

    def add(self, sample: Sample) -> None:
        image = image_entry(sample)
        for t in self.teachers:
            ids = self.cat_ids[t]
            anns = [instance_annotation(r, sample.image_id, ids[r["class_name"]]) for r in sample.labels
                    if r["teacher"] == t and r["class_id"] is not None and r["class_name"] in ids]
            self.files[t].add(dict(image), anns)

    def close(self) -> dict[str, list[str]]:
        return {t: w.close() for t, w in self.files.items()}


GROUNDING_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def grounding_annotation(row: dict, image_id: int) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": 1, **box_fields(row), "phrase": row["phrase"],
            "tokens_positive": [[int(a), int(b)] for a, b in (row["tokens_positive"] or [])]}


class GroundingByTeacher:
    """Per grounding teacher: an MDETR-style file (``<teacher>/grounding_NNNNN.json``, or ``file_for[t]``)."""

    def __init__(self, dest: Destination, source: ExportSource, teachers: list[str], images_per_file: int | None,
                 file_for: dict[str, str] | None = None):
        catalog = source.catalog()
        self.files = {
            t: ShardedCoco(dest, t, "grounding", [GROUNDING_CATEGORY], images_per_file,
                           f"labelmill grounding ({t}, version {source.version})", (file_for or {}).get(t))
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



@register("coco")
class CocoWriter(Writer):
    """``instances`` files per teacher, plus MDETR grounding files for grounding teachers."""

    def __init__(self, dest: Destination, source: ExportSource, *, teachers: list[str] | None = None,
                 classes: list[str] | None = None, category_ids: str | dict | None = None,
                 images_per_file: int = 50_000, grounding: bool = True):
        super().__init__(dest, source)
        self.instances = InstancesByTeacher(dest, source, teachers, classes, category_ids, images_per_file)
        wanted = select_teachers(source, teachers)
        self.grounding = GroundingByTeacher(dest, source, wanted, images_per_file) if grounding and not classes \
            else None
        self.teachers = wanted

    def add(self, sample: Sample) -> None:
        self.instances.add(sample)
        if self.grounding is not None:
            self.grounding.add(sample)

    def close(self) -> dict[str, Any]:
        files: dict[str, dict[str, list[str]]] = {t: {} for t in self.teachers}
        for t, names in self.instances.close().items():
            files[t]["instances"] = names
        if self.grounding is not None:
            for t, names in self.grounding.close().items():
                files[t]["grounding"] = names
        return {"files": files, "categories": self.instances.categories}


def export_coco(output: str, dest: str, *, version: int | str | None = None, images_per_file: int = 50_000,
                storage_options: dict | None = None, teachers: list[str] | None = None,
                classes: list[str] | None = None, category_ids: str | dict | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write COCO files for version ``version`` (default: latest) of ``output`` into ``dest``."""
    return run_export("coco", output, dest, version=version, overwrite=overwrite, storage_options=storage_options,
                      teachers=teachers, classes=classes, category_ids=category_ids, images_per_file=images_per_file)
