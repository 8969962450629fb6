"""COCO export of one dataset version's labels, streamed shard by shard.

``export_coco(output, dest)`` writes, for each teacher of the run:

* ``<teacher>/instances_00000.json, ...``: COCO ``instances`` files (images,
  annotations with ``bbox``, ``area``, ``score``, ``iscrowd`` and, for masks,
  an RLE ``segmentation``; ``categories``) of at most ``images_per_file``
  images each, which ``pycocotools.coco.COCO`` loads as they are;
* for grounding teachers (labels with a phrase and no class id, i.e. GLIP in
  caption mode), ``grounding_00000.json, ...`` in the MDETR/GLIP style: every
  image carries its ``caption`` and every annotation its ``tokens_positive``
  character spans into it and its ``phrase``.

Image ids are assigned in shard order, then index, so they are stable for a
given dataset version (``version=``, default the latest); ``file_name`` is the sample key (a key an
earlier shard already used becomes ``<shard name>/<key>``, so no two images
share a file name) and ``shard`` / ``index`` say where the image lives.
``iscrowd`` comes from the label (older outputs without it: 0).  Samples that failed are left out;
samples without labels are kept as images without annotations.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from labelmill.store.read import DatasetVersion, open_version


@dataclass
class _Writer:
    fs: Any
    folder: str
    stem: str
    images_per_file: int
    categories: list[dict]
    grounding: bool
    files: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    next_ann: int = 1

    def add(self, image: dict, anns: list[dict]) -> None:
        self.images.append(image)
        for ann in anns:
            ann["id"] = self.next_ann
            self.next_ann += 1
            self.annotations.append(ann)
        if len(self.images) >= self.images_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.images:
            return
        name = f"{self.stem}_{len(self.files):05d}.json"
        doc = {
            "info": {"description": f"labelmill pseudo-labels ({self.stem})"},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }
        self.fs.makedirs(self.folder, exist_ok=True)
        with self.fs.open(posixpath.join(self.folder, name), "w") as fh:
            json.dump(doc, fh)
        self.files.append(name)
        self.images, self.annotations = [], []


@dataclass
class TeacherCatalog:
    """What a teacher's labels contain: categories (vocabulary labels) and phrases."""

    categories: list[dict]
    grounding: bool


def catalog(ds: DatasetVersion) -> dict[str, TeacherCatalog]:
    """Per teacher: class names ordered by class id then name, and whether it grounds phrases."""
    seen: dict[str, dict[str, int]] = {}
    grounding: set[str] = set()
    if "labels" not in ds.table_names():
        return {}
    for table in ds.iter_batches("labels", ["teacher", "class_name", "class_id", "phrase"]):
        for teacher, name, cid, phrase in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            best = seen.setdefault(teacher, {})
            if phrase is not None and cid is None:
                grounding.add(teacher)
            if cid is None:
                continue
            best[name] = min(best.get(name, cid), cid)
    out = {}
    for teacher, names in seen.items():
        ordered = sorted(names, key=lambda n: (names[n], n))
        cats = [{"id": i + 1, "name": n, "supercategory": "pseudo"} for i, n in enumerate(ordered)]
        out[teacher] = TeacherCatalog(cats, teacher in grounding)
    return out


def export_coco(output: str, dest: str, *, images_per_file: int = 50_000, storage_options: dict | None = None,
                teachers: list[str] | None = None, version: int | str | None = None) -> dict[str, Any]:
    """Write COCO files for the labels of one dataset version of ``output`` (default: the latest) into ``dest``."""
    import fsspec

    ds = open_version(output, version, storage_options=storage_options)
    dest_fs, dest_root = fsspec.core.url_to_fs(dest, **(storage_options or {}))
    cats = catalog(ds)
    names = sorted(cats) if teachers is None else list(teachers)
    unknown = [t for t in names if t not in cats]
    if unknown:
        raise ValueError(f"no labels from teachers {unknown} in {output}; present: {sorted(cats)}")

    instances: dict[str, _Writer] = {}
    grounding: dict[str, _Writer] = {}
    cat_ids: dict[str, dict[str, int]] = {}
    for t in names:
        folder = posixpath.join(dest_root, t)
        if cats[t].categories:
            instances[t] = _Writer(dest_fs, folder, "instances", images_per_file, cats[t].categories, False)
            cat_ids[t] = {c["name"]: c["id"] for c in cats[t].categories}
        if cats[t].grounding:
            grounding[t] = _Writer(dest_fs, folder, "grounding", images_per_file, [GROUNDING_CATEGORY], True)

    label_files = ds.shard_paths("labels") if "labels" in ds.table_names() else {}
    image_id = 0
    file_names: set[str] = set()
    for shard, sample_files in ds.shard_paths("samples").items():  # one shard in memory at a time
        samples = ds.read_paths(sample_files).sort_by([("shard", "ascending"), ("index", "ascending")])
        labels = ds.read_paths(label_files[shard]) if label_files.get(shard) else None
        grouped = _group_labels(labels) if labels is not None else {}
        for row in samples.to_pylist():
            if row["status"] == "error":
                continue
            image_id += 1
            image = {
                "id": image_id,
                "file_name": _unique_file_name(row, file_names),
                "width": row["image_width"],
                "height": row["image_height"],
                "shard": row["shard"],
                "index": row["index"],
            }
            if row["caption"] is not None:
                image["caption"] = row["caption"]
            rows = grouped.get((row["shard"], row["index"]), [])
            for t in names:
                mine = [r for r in rows if r["teacher"] == t]
                if t in instances:
                    anns = [_annotation(r, image_id, cat_ids[t]) for r in mine if r["class_id"] is not None]
                    instances[t].add(dict(image), anns)
                if t in grounding and row["caption"] is not None:
                    anns = [_grounding_annotation(r, image_id) for r in mine
                            if r["phrase"] is not None and r["class_id"] is None]
                    grounding[t].add(dict(image), anns)
    report: dict[str, dict[str, list[str]]] = {t: {} for t in names}
    for kind, writers in (("instances", instances), ("grounding", grounding)):
        for t, w in writers.items():
            w.flush()
            report[t][kind] = [posixpath.join(t, f) for f in w.files]
    manifest = {"source": output, "version": ds.version, "images": image_id, "files": report}
    dest_fs.makedirs(dest_root, exist_ok=True)
    with dest_fs.open(posixpath.join(dest_root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


def _unique_file_name(row: dict, taken: set[str]) -> str:
    """The sample key; a key another shard already used gets its shard's name in front (``shard/key``)."""
    name = row["key"]
    if name in taken:
        stem = posixpath.basename(row["shard"])
        for suffix in (".tar.gz", ".tgz", ".tar"):
            stem = stem.removesuffix(suffix)
        name = f"{stem}/{row['key']}"
        if name in taken:
            name = f"{name}#{row['index']}"
    taken.add(name)
    return name


GROUNDING_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def _group_labels(labels: pa.Table) -> dict[tuple[str, int], list[dict]]:
    grouped: dict[tuple[str, int], list[dict]] = {}
    for row in labels.to_pylist():
        grouped.setdefault((row["shard"], row["index"]), []).append(row)
    return grouped


def _annotation(row: dict, image_id: int, cat_ids: dict[str, int]) -> dict:
    ann = {
        "image_id": image_id,
        "category_id": cat_ids[row["class_name"]],
        "bbox": [round(float(v), 2) for v in row["bbox"]],
        "area": float(row["area"]),
        "score": round(float(row["score"]), 5),
        "iscrowd": int(bool(row.get("iscrowd"))),  # absent in outputs written before labels had it
    }
    seg = row.get("segmentation")
    if seg is not None:
        ann["segmentation"] = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
    return ann


def _grounding_annotation(row: dict, image_id: int) -> dict:
    return {
        "image_id": image_id,
        "category_id": 1,
        "bbox": [round(float(v), 2) for v in row["bbox"]],
        "area": float(row["area"]),
        "score": round(float(row["score"]), 5),
        "iscrowd": 0,
        "phrase": row["phrase"],
        "tokens_positive": [[int(a), int(b)] for a, b in (row["tokens_positive"] or [])],
    }
