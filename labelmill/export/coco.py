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

    def __init__(self, dest: Destination, rel: str, categories: list[dict], description: str,
                 info: dict | None = None):
        self.rel = rel
        self._fh = dest.open(rel, "w")
        self._fh.write('{"info": ' + json.dumps({"description": description, **(info or {})}) + ', "licenses": [], '
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
                 images_per_file: int | None, description: str, single_name: str | None = None,
                 info: dict | None = None):
        self.info = info
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
            self._current = CocoJsonStream(self.dest, name, self.categories, self.description, self.info)
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


def source_info(source: ExportSource) -> dict[str, Any]:
    """What a COCO file's ``info`` says of its source: the output and version, and the folder images'
    ``shard`` fields are relative to."""
    return {"source": source.output_uri, "version": source.version, "shard_root": source.shard_root}


def image_entry(sample: Sample) -> dict[str, Any]:
    image = {"id": sample.image_id, "file_name": sample.file_name, "width": sample.width, "height": sample.height,
             "shard": sample.shard_name or sample.shard, "key": sample.key, "index": sample.index}
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
                                        f"labelmill pseudo-labels ({t}, version {source.version})", single,
                                        source_info(source))

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
                           f"labelmill grounding ({t}, version {source.version})", (file_for or {}).get(t),
                           source_info(source))
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



class ResultsByTeacher:
    """Per teacher with class labels: ``<teacher>/results.json``, the COCO *results* format that
    ``COCO.loadRes`` and ``COCOeval`` read: a JSON list of ``{image_id, category_id, bbox, score}``
    (plus the RLE ``segmentation`` of mask labels, as Detectron2 writes them), streamed.

    With ``gt`` (a COCO ground-truth file), image ids are the ground truth's, matched by ``file_name``
    (its base name), and category ids the ground truth's, matched by name; images and classes the ground
    truth lacks are left out and counted.  Without it, the ids are the export's own (its instances files).
    """

    def __init__(self, dest: Destination, teachers: list[str], cat_ids: dict[str, dict[str, int]],
                 gt: str | None):
        self.gt_images: dict[str, int] | None = None
        self.allowed = {t: set(cat_ids[t]) for t in teachers}  # the exported classes (--classes)
        self.cat_ids = cat_ids
        if gt is not None:
            self.gt_images, gt_cats = load_ground_truth(gt)
            self.cat_ids = {t: {n: c["id"] for n, c in gt_cats.items()} for t in teachers}
        self.files = {t: dest.open(posixpath.join(t, "results.json"), "w") for t in teachers}
        self.counts = {t: {"detections": 0, "images_not_in_gt": 0, "classes_not_in_gt": 0} for t in teachers}
        for fh in self.files.values():
            fh.write("[")

    def add(self, sample: Sample) -> None:
        for t, fh in self.files.items():
            image_id = sample.image_id
            if self.gt_images is not None:
                image_id = self.gt_images.get(posixpath.basename(sample.file_name))
                if image_id is None:
                    self.counts[t]["images_not_in_gt"] += 1
                    continue
            ids = self.cat_ids[t]
            for r in sample.labels:
                if r["teacher"] != t or r["class_id"] is None or r["class_name"] not in self.allowed[t]:
                    continue
                cid = ids.get(r["class_name"])
                if cid is None:
                    self.counts[t]["classes_not_in_gt"] += 1
                    continue
                det = {"image_id": image_id, "category_id": cid,
                       "bbox": [round(float(v), 2) for v in r["bbox"]], "score": round(float(r["score"]), 5)}
                seg = r.get("segmentation")
                if seg is not None:
                    det["segmentation"] = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
                fh.write((", " if self.counts[t]["detections"] else "") + json.dumps(det))
                self.counts[t]["detections"] += 1

    def close(self) -> dict[str, dict]:
        for fh in self.files.values():
            fh.write("]")
            fh.close()
        return {t: {"file": posixpath.join(t, "results.json"), **c} for t, c in self.counts.items()}


def load_ground_truth(path: str) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """A COCO ground-truth file's image ids by base file name, and its categories by name."""
    import fsspec

    from labelmill.export.base import ExportOptionError

    cats = load_category_ids(path)
    with fsspec.open(path, "r") as fh:
        doc = json.load(fh)
    try:
        images = {posixpath.basename(str(img["file_name"])): int(img["id"]) for img in doc["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportOptionError(f"--gt file {path} has no COCO 'images' list with id and file_name "
                                f"({type(exc).__name__}: {exc})") from None
    return images, cats


@register("coco")
class CocoWriter(Writer):
    """``instances`` files per teacher, plus MDETR grounding files for grounding teachers."""

    def __init__(self, dest: Destination, source: ExportSource, *, teachers: list[str] | None = None,
                 classes: list[str] | None = None, category_ids: str | dict | None = None,
                 images_per_file: int = 50_000, grounding: bool = True, results: bool = False,
                 gt: str | None = None):
        super().__init__(dest, source)
        self.instances = InstancesByTeacher(dest, source, teachers, classes, category_ids, images_per_file)
        wanted = select_teachers(source, teachers)
        self.grounding = GroundingByTeacher(dest, source, wanted, images_per_file) if grounding and not classes \
            else None
        self.teachers = wanted
        self.results = ResultsByTeacher(dest, self.instances.teachers, self.instances.cat_ids, gt) \
            if results or gt else None

    def add(self, sample: Sample) -> None:
        self.instances.add(sample)
        if self.grounding is not None:
            self.grounding.add(sample)
        if self.results is not None:
            self.results.add(sample)

    def close(self) -> dict[str, Any]:
        files: dict[str, dict[str, list[str]]] = {t: {} for t in self.teachers}
        for t, names in self.instances.close().items():
            files[t]["instances"] = names
        if self.grounding is not None:
            for t, names in self.grounding.close().items():
                files[t]["grounding"] = names
        out = {"files": files, "categories": self.instances.categories}
        if self.results is not None:
            out["results"] = self.results.close()
            for t, r in out["results"].items():
                files[t]["results"] = [r["file"]]
        return out


def export_coco(output: str, dest: str, *, version: int | str | None = None, images_per_file: int = 50_000,
                storage_options: dict | None = None, teachers: list[str] | None = None,
                classes: list[str] | None = None, category_ids: str | dict | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write COCO files for version ``version`` (default: latest) of ``output`` into ``dest``."""
    return run_export("coco", output, dest, version=version, overwrite=overwrite, storage_options=storage_options,
                      teachers=teachers, classes=classes, category_ids=category_ids, images_per_file=images_per_file)
