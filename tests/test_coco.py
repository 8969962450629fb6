"""COCO export: pycocotools loads it, masks and boxes survive exactly, sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from helpers import COCO128, gt_sample, gt_teacher, run_config
from labelmill.export.coco import export_coco
from labelmill.config import load_config
from labelmill.pipelines.label import run
from labelmill.io.shards import write_shard


def ground_truth_file(samples, path) -> str:
    """An independent COCO ground-truth file built straight from the sample metadata."""
    images, anns, cats = [], [], {}
    for i, (key, members) in enumerate(samples, 1):
        meta = json.loads(members["json"])
        h, w = meta["annotations"][0]["segmentation"]["size"]
        images.append({"id": i, "file_name": f"{key}.png", "height": h, "width": w})
        for a in meta["annotations"]:
            rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
            cats[a["category"]] = a["category_id"]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": a["category_id"], "iscrowd": 0,
                         "segmentation": a["segmentation"], "area": float(mask_utils.area(rle)),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": i, "name": n} for n, i in sorted(cats.items(), key=lambda kv: kv[1])]}
    path.write_text(json.dumps(doc))
    return str(path)


def evaluate(gt_path: str, exported: list[str], iou_type: str) -> float:
    gt = COCO(gt_path)
    by_name = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
    name_to_cat = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    dets = []
    for path in exported:
        ours = COCO(path)
        id_to_name = {c["id"]: c["name"] for c in ours.dataset["categories"]}
        for ann in ours.dataset["annotations"]:
            img = ours.imgs[ann["image_id"]]
            dets.append({"image_id": by_name[img["file_name"]], "category_id": name_to_cat[id_to_name[ann["category_id"]]],
                         "segmentation": ann["segmentation"], "bbox": ann["bbox"], "score": ann["score"]})
    ev = COCOeval(gt, gt.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0])


def test_coco_round_trip_through_the_pipeline_is_exact(tmp_path, ray_session):
    samples = [gt_sample(f"img{i:03d}", seed=i) for i in range(10)]
    write_shard(str(tmp_path / "shards" / "a.tar"), samples[:6])
    write_shard(str(tmp_path / "shards" / "b.tar"), samples[6:])
    out = str(tmp_path / "out")
    run(load_config(run_config(str(tmp_path / "shards"), out, teachers=[gt_teacher(score=0.9)])))
    manifest = export_coco(out, str(tmp_path / "coco"), images_per_file=4)
    files = [str(tmp_path / "coco" / f) for f in manifest["files"]["gt"]["instances"]]
    assert len(files) == 3 and manifest["images"] == 10  # 4 + 4 + 2 images

    total_images = 0
    for path in files:
        coco = COCO(path)
        total_images += len(coco.imgs)
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            key = img["key"]
            assert img["file_name"] == f"{key}.png"  # the image's real name in the shard
            (truth,) = [a for a in json.loads(dict(samples)[key]["json"])["annotations"]
                        if a["segmentation"]["counts"] == ann["segmentation"]["counts"]]
            expected = mask_utils.decode({"size": truth["segmentation"]["size"],
                                          "counts": truth["segmentation"]["counts"].encode()})
            assert np.array_equal(coco.annToMask(ann), expected)
            assert ann["area"] == expected.sum() and ann["score"] == pytest.approx(0.9)
            assert coco.cats[ann["category_id"]]["name"] == truth["category"]
    assert total_images == 10
    gt_path = ground_truth_file(samples, tmp_path / "gt.json")
    assert evaluate(gt_path, files, "segm") == pytest.approx(1.0)
    assert evaluate(gt_path, files, "bbox") == pytest.approx(1.0)


@pytest.mark.skipif(not COCO128.exists(), reason="../shared/data/coco128 is not present")
def test_real_coco128_annotations_round_trip(tmp_path, ray_session):
    """Real photos and real annotations through the whole pipeline: COCOeval must call it perfect."""
    coco = COCO(str(COCO128 / "instances.json"))
    cat_names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    samples, gt_images, gt_anns = [], [], []
    for img in sorted(coco.dataset["images"], key=lambda i: i["id"])[:24]:
        anns = [a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"]]
        meta = []
        for a in anns:
            rle = coco.annToRLE(a)
            meta.append({"category": cat_names[a["category_id"]], "category_id": a["category_id"],
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
        key = img["file_name"].rsplit(".", 1)[0]
        data = (COCO128 / "images" / img["file_name"]).read_bytes()
        samples.append((key, {"jpg": data, "txt": b"a photo", "json": json.dumps({"annotations": meta}).encode()}))
        gt_images.append(img)  # the user's own file names (000000000009.jpg ...)
        gt_anns += [a for a in anns]
    write_shard(str(tmp_path / "shards" / "coco.tar"), samples)
    out = str(tmp_path / "out")
    run(load_config(run_config(str(tmp_path / "shards"), out, teachers=[gt_teacher()])))
    manifest = export_coco(out, str(tmp_path / "coco"))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"images": gt_images, "annotations": gt_anns,
                                   "categories": coco.dataset["categories"]}))
    files = [str(tmp_path / "coco" / f) for f in manifest["files"]["gt"]["instances"]]
    assert evaluate(str(gt_path), files, "segm") == pytest.approx(1.0)
    # no remapping: file names, category ids and supercategories are the user's own
    official = {c["id"]: c for c in coco.dataset["categories"]}
    ours = COCO(files[0])
    gt = COCO(str(gt_path))
    by_name = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    assert all(official[c["id"]] == {k: c[k] for k in ("id", "name", "supercategory")}
               for c in ours.dataset["categories"])
    dets = [{"image_id": by_name[ours.imgs[a["image_id"]]["file_name"]], "category_id": a["category_id"],
             "segmentation": a["segmentation"], "score": a["score"]} for a in ours.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)




def test_polygons_crowds_given_boxes_and_repeated_keys(tmp_path, ray_session):
    """iscrowd travels from the ground truth to the labels table and COCO; the example plug-in takes COCO
    polygons and keeps given boxes; a key used by two shards gives two distinct COCO file names."""
    from deltalake import DeltaTable

    h, w = 64, 96
    poly = [[10.0, 5.0, 50.5, 5.0, 50.5, 40.25, 10.0, 40.25]]
    crowd = np.zeros((h, w), np.uint8, order="F")
    crowd[45:60, 60:90] = 1
    crowd_rle = mask_utils.encode(crowd)
    anns = [
        {"category": "block1", "category_id": 1, "segmentation": poly, "bbox": [10.0, 5.0, 40.5, 35.25],
         "iscrowd": 0},
        {"category": "block2", "category_id": 2, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": crowd_rle["counts"].decode()}},
    ]
    key, members = gt_sample("same", seed=1, w=w, h=h)
    members = dict(members, json=json.dumps({"annotations": anns}).encode())
    write_shard(str(tmp_path / "shards" / "a.tar"), [(key, members)])
    write_shard(str(tmp_path / "shards" / "b.tar"), [(key, members)])
    out = str(tmp_path / "out")
    run(load_config(run_config(str(tmp_path / "shards"), out, teachers=[gt_teacher()])))

    labels = DeltaTable(f"{out}/labels").to_pandas().sort_values(["shard", "class_id"])
    assert labels.iscrowd.tolist() == [False, True, False, True]

    manifest = export_coco(out, str(tmp_path / "coco"))
    (path,) = manifest["files"]["gt"]["instances"]
    coco = COCO(str(tmp_path / "coco" / path))
    names = sorted(img["file_name"] for img in coco.dataset["images"])
    assert names[0] == "b/" + names[1] and names[1].startswith("same")  # never two images with one file_name
    for ann in coco.dataset["annotations"]:
        if ann["category_id"] == coco.getCatIds(catNms=["block1"])[0]:
            assert ann["iscrowd"] == 0 and ann["bbox"] == [10.0, 5.0, 40.5, 35.25]  # the given box
            want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, h, w)))
            assert np.array_equal(coco.annToMask(ann), want)
        else:
            assert ann["iscrowd"] == 1 and np.array_equal(coco.annToMask(ann), crowd)
