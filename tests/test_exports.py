"""Exports from a pinned version: YOLO (detect, segment), FiftyOne, COCO ids, --version; through the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from skimage.draw import polygon2mask

import labelmill.data
from helpers import encode, gt_teacher, photo, run_config
from labelmill.cli import main
from labelmill.config import load_config
from labelmill.io.shards import iter_shard, write_shard
from labelmill.pipelines.label import run


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def _sample(key: str, seed: int, ext: str, w: int = 96, h: int = 64):
    """Two labelled objects: a two-part 'cat' and a 'dog' with a hole and a detached stub."""
    rng = np.random.default_rng(seed)
    cat = np.zeros((h, w), bool)
    y, x = int(rng.integers(0, 10)), int(rng.integers(0, 20))
    cat[y : y + 15, x : x + 20] = True
    cat[30:40, 50 + seed % 5 : 70] = True
    dog = np.zeros((h, w), bool)
    dog[20:50, 20:60] = True
    dog[30:35, 30:40] = False
    dog[int(rng.integers(0, 10)), :5] = True
    anns = [{"category": "cat", "category_id": 15, "segmentation": _rle(cat)},
            {"category": "dog", "category_id": 16, "segmentation": _rle(dog)}]
    if seed == 3:
        anns = []  # an image without labels: an empty label file
    fmt = {"png": "PNG", "JPG": "JPEG"}[ext]
    return key, {ext: encode(photo(w, h, seed), fmt), "txt": f"photo {key}".encode(),
                 "json": json.dumps({"annotations": anns}).encode()}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_session):
    """An output with two versions (one shard each): 4 + 2 images, png and JPG members."""
    root = tmp_path_factory.mktemp("exports")
    samples = [_sample(f"img{i:03d}", i, ["png", "JPG"][i % 2]) for i in range(6)]
    write_shard(str(root / "shards" / "a.tar"), samples[:4])
    write_shard(str(root / "shards" / "b.tar"), samples[4:])
    out = str(root / "out")
    cfg = run_config(str(root / "shards"), out, teachers=[gt_teacher(score=0.9)])
    cfg["output"]["commit_every_shards"] = 1
    run(load_config(cfg))
    return root, out, dict(samples)


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _stored_labels(out: str) -> dict[str, list[dict]]:
    by_key: dict[str, list[dict]] = {}
    for row in labelmill.data.open(out).read("labels").to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    return by_key


def _denorm(values: list[float], w: int, h: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 2) * [w, h]


def test_yolo_detect_round_trips_boxes_and_copies_the_images(labelled, tmp_path):
    root, out, samples = labelled
    dest = tmp_path / "yolo"
    assert _cli("export-yolo", out, dest) == 0
    doc = yaml.safe_load((dest / "data.yaml").read_text())
    assert doc["names"] == {0: "cat", 1: "dog"} and doc["train"] == doc["val"] == "images"
    names = {0: "cat", 1: "dog"}
    stored = _stored_labels(out)
    assert sorted(os.listdir(dest / "images")) == sorted(f"img{i:03d}.{['png', 'JPG'][i % 2]}" for i in range(6))
    for key, members in samples.items():
        (ext,) = [e for e in members if e in ("png", "JPG")]
        assert (dest / "images" / f"{key}.{ext}").read_bytes() == members[ext]  # the shard's bytes, real name
        lines = [ln.split() for ln in (dest / "labels" / f"{key}.txt").read_text().splitlines()]
        truth = stored.get(key, [])
        assert len(lines) == len(truth)
        for row in truth:
            w, h = row["image_width"], row["image_height"]
            x, y, bw, bh = row["bbox"]
            matches = []
            for ln in lines:
                cx, cy, nw, nh = (float(v) for v in ln[1:])
                box = np.array([(cx - nw / 2) * w, (cy - nh / 2) * h, nw * w, nh * h])
                if names[int(ln[0])] == row["class_name"] and np.abs(box - [x, y, bw, bh]).max() <= 1.0:
                    matches.append(ln)
            assert len(matches) == 1, (key, row["class_name"])
    assert not (dest / "labels" / "img003.txt").read_text()  # no labels: a background image


def test_yolo_segment_polygons_round_trip_within_one_pixel(labelled, tmp_path):
    root, out, samples = labelled
    dest = tmp_path / "seg"
    assert _cli("export-yolo", out, dest, "--task", "segment", "--images", "none") == 0
    assert not (dest / "images").exists()
    stored = _stored_labels(out)
    checked = 0
    for key, rows in stored.items():
        lines = [ln.split() for ln in (dest / "labels" / f"{key}.txt").read_text().splitlines()]
        assert len(lines) == len(rows)
        for row in rows:
            w, h = row["image_width"], row["image_height"]
            seg = row["segmentation"]
            stored_mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            parts, n = ndimage.label(stored_mask)  # the format has no holes: each part's holes are filled
            truth = np.zeros_like(stored_mask)
            for i in range(1, n + 1):
                truth |= ndimage.binary_fill_holes(parts == i)
            ring = ndimage.binary_dilation(truth) & ~ndimage.binary_erosion(truth)
            best = None
            for ln in lines:
                if int(ln[0]) != ["cat", "dog"].index(row["class_name"]):
                    continue
                poly = _denorm([float(v) for v in ln[1:]], w, h)
                drawn = polygon2mask((h, w), np.stack([poly[:, 1] - 0.5, poly[:, 0] - 0.5], 1))
                off = drawn ^ truth
                if not (off & ~ring).any():  # every differing pixel is on the mask's one-pixel rim
                    lo, hi = poly.min(0), poly.max(0)
                    x, y, bw, bh = row["bbox"]
                    assert np.abs(np.r_[lo, hi - lo] - [x, y, bw, bh]).max() <= 1.0
                    best = off.sum()
            assert best is not None, (key, row["class_name"])
            assert best == 0  # the traced outline is exact, not just within the pixel
            checked += 1
    assert checked == 10  # 5 labelled images x 2 objects (one in two parts, one with a hole and a stub)


def test_yolo_link_mode_classes_and_version(labelled, tmp_path):
    root, out, samples = labelled
    cache = tmp_path / "cache"
    dest = tmp_path / "linked"
    assert _cli("export-yolo", out, dest, "--images", "link", "--image-cache", cache, "--classes", "dog",
                "--version", "1") == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["images"] in (2, 4)  # one shard's worth
    images = sorted(os.listdir(dest / "images"))
    assert len(images) == manifest["images"]
    cached = {p.name: p for p in cache.rglob("*") if p.is_file()}
    for name in images:
        assert os.stat(dest / "images" / name).st_ino == os.stat(cached[name]).st_ino  # a hard link, no copy
    assert yaml.safe_load((dest / "data.yaml").read_text())["names"] == {0: "dog"}
    for name in images:
        stem = name.rsplit(".", 1)[0]
        classes = {ln.split()[0] for ln in (dest / "labels" / f"{stem}.txt").read_text().splitlines()}
        assert classes <= {"0"}
    # a timestamp picks the version current then
    again = tmp_path / "by-time"
    assert _cli("export-yolo", out, again, "--images", "none", "--version", manifest["version_time"]) == 0
    assert json.loads((again / "manifest.json").read_text())["version"] == 1
    latest = tmp_path / "latest"
    assert _cli("export-yolo", out, latest, "--images", "none") == 0
    assert json.loads((latest / "manifest.json").read_text())["images"] == 6


def test_coco_export_uses_official_ids_and_real_file_names(labelled, tmp_path):
    root, out, samples = labelled
    dest = tmp_path / "coco"
    assert _cli("export-coco", out, dest) == 0
    coco = COCO(str(dest / "gt" / "instances_00000.json"))
    assert sorted((c["id"], c["name"], c["supercategory"]) for c in coco.dataset["categories"]) == [
        (17, "cat", "animal"), (18, "dog", "animal")]
    names = {img["file_name"] for img in coco.dataset["images"]}
    assert names == {f"img{i:03d}.{['png', 'JPG'][i % 2]}" for i in range(6)}
    stored = _stored_labels(out)
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        (row,) = [r for r in stored[img["key"]] if r["segmentation"]["counts"] == ann["segmentation"]["counts"]]
        assert coco.cats[ann["category_id"]]["name"] == row["class_name"]

    # the user's own ids: a COCO file of theirs (or a {name: id} map)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"categories": [{"id": 7, "name": "dog", "supercategory": "pet"},
                                              {"id": 3, "name": "cat", "supercategory": "pet"}]}))
    mine = tmp_path / "mine"
    assert _cli("export-coco", out, mine, "--category-ids", ids, "--classes", "dog") == 0
    coco = COCO(str(mine / "gt" / "instances_00000.json"))
    assert coco.dataset["categories"] == [{"id": 7, "name": "dog", "supercategory": "pet"}]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {7}
    assert len(coco.dataset["annotations"]) == 5
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"dog": 7}))
    assert _cli("export-coco", out, tmp_path / "x", "--category-ids", partial) == 2  # no id for 'cat'
    assert not (tmp_path / "x").exists()


# FiftyOne's documented COCODetectionDataset labels format (the fields its importer reads)
FIFTYONE_COCO = {
    "type": "object",
    "required": ["images", "annotations", "categories"],
    "properties": {
        "categories": {"type": "array", "items": {"type": "object", "required": ["id", "name"],
                                                  "properties": {"id": {"type": "integer"},
                                                                 "name": {"type": "string"}}}},
        "images": {"type": "array", "items": {"type": "object", "required": ["id", "file_name", "width", "height"],
                                              "properties": {"id": {"type": "integer"},
                                                             "file_name": {"type": "string"},
                                                             "width": {"type": "integer"},
                                                             "height": {"type": "integer"}}}},
        "annotations": {"type": "array", "items": {
            "type": "object", "required": ["id", "image_id", "category_id", "bbox"],
            "properties": {
                "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                "score": {"type": "number"},
                "segmentation": {"type": "object", "required": ["size", "counts"],
                                 "properties": {"size": {"type": "array", "items": {"type": "integer"}},
                                                "counts": {"type": "string"}}}}}},
    },
}


def test_fiftyone_dataset_layout_masks_and_scores(labelled, tmp_path):
    import jsonschema

    root, out, samples = labelled
    dest = tmp_path / "fo"
    assert _cli("export-fiftyone", out, dest) == 0
    labels = dest / "labels" / "gt.json"
    doc = json.loads(labels.read_text())
    jsonschema.validate(doc, FIFTYONE_COCO)
    for img in doc["images"]:
        assert (dest / "data" / img["file_name"]).is_file()
    coco = COCO(str(labels))
    stored = _stored_labels(out)
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        (row,) = [r for r in stored[img["key"]] if r["segmentation"]["counts"] == ann["segmentation"]["counts"]]
        seg = row["segmentation"]
        assert np.array_equal(coco.annToMask(ann), mask_utils.decode({"size": seg["size"],
                                                                      "counts": seg["counts"].encode()}))
        assert ann["score"] == pytest.approx(0.9)

    fouc = pytest.importorskip("fiftyone.utils.coco", reason="fiftyone is not installed")
    # FiftyOne's own importer, the one Dataset.from_dir(dataset_type=COCODetectionDataset) runs
    importer = fouc.COCODetectionDatasetImporter(data_path=str(dest / "data"), labels_path=str(labels),
                                                 label_types=["segmentations"])
    seen = 0
    with importer:
        for path, meta, dets in importer:
            name = os.path.basename(path)
            img = next(i for i in doc["images"] if i["file_name"] == name)
            assert os.path.isfile(path) and (meta.width, meta.height) == (img["width"], img["height"])
            for det in (dets.detections if dets is not None else []):
                assert det.label in ("cat", "dog") and det.confidence == pytest.approx(0.9)
                assert det.mask is not None and det.mask.any()
                seen += 1
    assert seen == len(doc["annotations"]) == 10
