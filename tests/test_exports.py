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
from skimage.draw import line as draw_line
from skimage.draw import polygon as draw_polygon

import labelmill.data
from helpers import encode, gt_teacher, photo, run_config
from labelmill.cli import main
from labelmill.config import load_config
from labelmill.io.shards import write_shard
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


def _split(key: str) -> str:
    from labelmill.export.yolo import split_of

    return split_of(key, 0.1)


def _images(dest) -> list[str]:
    return sorted(p.name for p in (dest / "images").rglob("*") if p.is_file())


def _denorm(values: list[float], w: int, h: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 2) * [w, h]


def test_yolo_detect_round_trips_boxes_and_copies_the_images(labelled, tmp_path):
    root, out, samples = labelled
    dest = tmp_path / "yolo"
    assert _cli("export-yolo", out, dest) == 0
    doc = yaml.safe_load((dest / "data.yaml").read_text())
    assert doc["names"] == {0: "cat", 1: "dog"} and doc["train"] == "images/train"
    manifest = json.loads((dest / "manifest.json").read_text())
    splits = {k: _split(k) for k in samples}
    assert manifest["splits"] == {s: list(splits.values()).count(s) for s in ("train", "val")}
    assert doc["val"] == ("images/val" if "val" in splits.values() else "images/train")
    names = {0: "cat", 1: "dog"}
    stored = _stored_labels(out)
    assert _images(dest) == sorted(f"img{i:03d}.{['png', 'JPG'][i % 2]}" for i in range(6))
    for key, members in samples.items():
        (ext,) = [e for e in members if e in ("png", "JPG")]
        split = splits[key]
        assert (dest / "images" / split / f"{key}.{ext}").read_bytes() == members[ext]  # the shard's bytes
        lines = [ln.split() for ln in (dest / "labels" / split / f"{key}.txt").read_text().splitlines()]
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
    assert not (dest / "labels" / splits["img003"] / "img003.txt").read_text()  # no labels: a background image


def fill_like_opencv(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """A polygon filled as Ultralytics does (coordinates truncated to pixels, then ``cv2.fillPoly``: the pixels
    whose centres are inside, plus every pixel the edges cross), written from OpenCV's documented rule."""
    pts = poly.astype(np.int64)
    out = np.zeros((h, w), bool)
    rr, cc = draw_polygon(pts[:, 1], pts[:, 0], (h, w))
    out[rr, cc] = True
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        rr, cc = draw_line(int(y0), int(x0), int(y1), int(x1))
        keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out[rr[keep], cc[keep]] = True
    return out


def bridge_pixels(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixels on the polygon's bridges: edges both of whose ends are vertices the walk visits twice."""
    pts = [tuple(p) for p in poly.astype(np.int64).tolist()]
    twice = {p for p in pts if pts.count(p) > 1}
    out = np.zeros((h, w), bool)
    for a, b in zip(pts, pts[1:] + pts[:1]):
        if a in twice and b in twice:
            rr, cc = draw_line(a[1], a[0], b[1], b[0])
            out[rr, cc] = True
    return ndimage.binary_dilation(out)  # OpenCV's line may step on the neighbouring pixel


def test_yolo_segment_polygons_fill_back_to_the_mask_under_opencv(labelled, tmp_path):
    root, out, samples = labelled
    dest = tmp_path / "seg"
    assert _cli("export-yolo", out, dest, "--task", "segment", "--images", "none") == 0
    assert not (dest / "images").exists()
    stored = _stored_labels(out)
    checked = 0
    for key, rows in stored.items():
        lines = [ln.split() for ln in (dest / "labels" / _split(key) / f"{key}.txt").read_text().splitlines()]
        assert len(lines) == len(rows)
        for row in rows:
            w, h = row["image_width"], row["image_height"]
            seg = row["segmentation"]
            stored_mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            parts, n = ndimage.label(stored_mask)  # the format has no holes: each part's holes are filled
            truth = np.zeros_like(stored_mask)
            for i in range(1, n + 1):
                truth |= ndimage.binary_fill_holes(parts == i)
            matched = 0
            for ln in lines:
                if int(ln[0]) != ["cat", "dog"].index(row["class_name"]):
                    continue
                poly = _denorm([float(v) for v in ln[1:]], w, h)
                drawn = fill_like_opencv(poly, h, w)
                if (truth & ~drawn).any():
                    continue  # another object's line
                extra = drawn & ~truth
                # the only extra pixels are on the bridges joining the parts (walked out and back)
                assert not (extra & ~bridge_pixels(poly, h, w)).any(), (key, row["class_name"])
                lo, hi = poly.min(0), poly.max(0)
                x, y, bw, bh = row["bbox"]  # vertices on the edge pixels' centres (+ 1/4 px, see CENTRE_NUDGE)
                assert np.abs(np.r_[lo, hi - lo] - [x + 0.25, y + 0.25, bw - 1, bh - 1]).max() <= 1e-3
                matched += 1
            assert matched == 1, (key, row["class_name"])
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
    images = _images(dest)
    assert len(images) == manifest["images"]
    cached = {p.name: p for p in cache.rglob("*") if p.is_file()}
    for name in images:
        stem = name.rsplit(".", 1)[0]
        linked = dest / "images" / _split(stem) / name
        assert os.stat(linked).st_ino == os.stat(cached[name]).st_ino  # a hard link, no copy
    # --classes leaves the other classes' labels out; the numbers stay those of the full export
    assert yaml.safe_load((dest / "data.yaml").read_text())["names"] == {0: "cat", 1: "dog"}
    assert manifest["exported_classes"] == ["dog"]
    for name in images:
        stem = name.rsplit(".", 1)[0]
        classes = {ln.split()[0] for ln in (dest / "labels" / _split(stem) / f"{stem}.txt").read_text().splitlines()}
        assert classes <= {"1"}
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


def test_coco_results_file_scores_against_the_users_ground_truth(labelled, tmp_path):
    """--gt: results.json in the ground truth's own image and category ids; COCOeval of labels equal to the
    ground truth gives AP 1.0 for boxes and masks (ids from the ground truth, not the export's)."""
    from pycocotools.cocoeval import COCOeval

    root, out, samples = labelled
    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    for i, (key, members) in enumerate(sorted(samples.items())):
        (ext,) = [e for e in members if e in ("png", "JPG")]
        gt["images"].append({"id": 500 + i, "file_name": f"val/{key}.{ext}", "width": 96, "height": 64})
        for ann in json.loads(members["json"])["annotations"]:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": 500 + i, "iscrowd": 0,
                "category_id": {"cat": 3, "dog": 7}[ann["category"]], "segmentation": ann["segmentation"],
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle))})
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    dest = tmp_path / "res"
    assert _cli("export-coco", out, dest, "--gt", gt_path) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["results"]["gt"]["detections"] == len(gt["annotations"]) == 10
    assert manifest["results"]["gt"]["images_not_in_gt"] == 0
    coco_gt = COCO(str(gt_path))
    dets = coco_gt.loadRes(str(dest / "gt" / "results.json"))
    assert {a["image_id"] for a in dets.dataset["annotations"]} <= set(coco_gt.imgs)
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco_gt, dets, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type
    # without --gt: the export's own ids, which its instances file holds
    assert _cli("export-coco", out, tmp_path / "own", "--results") == 0
    own = COCO(str(tmp_path / "own" / "gt" / "instances_00000.json"))
    mine = own.loadRes(str(tmp_path / "own" / "gt" / "results.json"))
    assert len(mine.dataset["annotations"]) == 10 and {c for c in mine.cats} == {17, 18}


def test_export_paths_are_absolute_sources_and_relative_shards(labelled, tmp_path, monkeypatch):
    root, out, samples = labelled
    monkeypatch.chdir(root)
    assert _cli("export-coco", "out", tmp_path / "c") == 0  # OUTPUT typed relative to where the command ran
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["source"] == str(root / "out") and manifest["shard_root"] == str(root / "shards")
    doc = json.loads((tmp_path / "c" / "gt" / "instances_00000.json").read_text())
    assert doc["info"]["shard_root"] == str(root / "shards") and doc["info"]["source"] == str(root / "out")
    assert {img["shard"] for img in doc["images"]} == {"a.tar", "b.tar"}
