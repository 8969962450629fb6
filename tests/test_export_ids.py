"""Class ids that never move: COCO, YOLO and ODVG give every class the same id in every version and with
--classes; ODVG read by the rules of mmdet's ODVGDataset; export-odvg's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import labelmill.data
from helpers import encode, gt_teacher, photo, run_config
from labelmill.cli import main
from labelmill.config import load_config
from labelmill.io.shards import write_shard
from labelmill.pipelines.label import run

VOCAB = ["pizza", "teddy bear", "gizmo", "parking meter", "sky"]
#: official COCO ids, COCO-Stuff's id for sky, 1001 for the name COCO does not have
EXPECTED_IDS = {"pizza": 59, "teddy bear": 88, "gizmo": 1001, "parking meter": 14, "sky": 157}


def _ann(name: str, x: int, y: int, w: int = 20, h: int = 14, size=(64, 96)) -> dict:
    m = np.zeros(size, np.uint8)
    m[y : y + h, x : x + w] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"category": name, "category_id": VOCAB.index(name),
            "segmentation": {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}}


def _sample(key: str, seed: int, names: list[str]):
    anns = [_ann(n, 5 + 30 * i, 5 + 10 * i) for i, n in enumerate(names)]
    return key, {"jpg": encode(photo(96, 64, seed)), "txt": f"photo {key}".encode(),
                 "json": json.dumps({"annotations": anns}).encode()}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, ray_session):
    """Version 1: shard a (pizza, gizmo only); version 2 adds shard b (teddy bear, parking meter, sky)."""
    root = tmp_path_factory.mktemp("ids")
    write_shard(str(root / "shards" / "a.tar"), [_sample(f"a{i}", i, ["pizza", "gizmo"][: 1 + i % 2]) for i in range(4)])
    write_shard(str(root / "shards" / "b.tar"),
                [_sample(f"b{i}", 10 + i, ["teddy bear", "parking meter", "sky"]) for i in range(3)])
    out = str(root / "out")
    cfg = run_config(str(root / "shards"), out, teachers=[gt_teacher(score=0.9, vocabulary=VOCAB)])
    cfg["output"]["commit_every_shards"] = 1
    run(load_config(cfg))
    assert [r["version"] for r in labelmill.data.versions(out)] == [1, 2]
    return root, out


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _coco_ids(dest) -> dict[str, int]:
    (path,) = sorted((dest / "gt").glob("instances_*.json"))
    coco = COCO(str(path))
    for ann in coco.dataset["annotations"]:  # every annotation's category is the class its stored label names
        img = coco.imgs[ann["image_id"]]
        assert coco.cats[ann["category_id"]]["name"] in VOCAB and img["key"]
    return {c["name"]: c["id"] for c in coco.dataset["categories"]}


def test_coco_ids_are_the_same_in_every_version_and_with_classes(two_versions, tmp_path):
    root, out = two_versions
    assert _cli("export-coco", out, tmp_path / "v1", "--version", "1") == 0
    assert _cli("export-coco", out, tmp_path / "v2") == 0
    assert _cli("export-coco", out, tmp_path / "some", "--classes", "parking meter", "pizza") == 0
    # a class with no label in the version: not an error, no annotation (a night without cars)
    assert _cli("export-coco", out, tmp_path / "none", "--version", "1", "--classes", "parking meter") == 0
    v1, v2 = _coco_ids(tmp_path / "v1"), _coco_ids(tmp_path / "v2")
    assert v1 == v2 == EXPECTED_IDS  # every class listed, labelled in the version or not
    assert _coco_ids(tmp_path / "some") == {"pizza": 59, "parking meter": 14}
    assert _coco_ids(tmp_path / "none") == {"parking meter": 14}
    assert json.loads((tmp_path / "none" / "gt" / "instances_00000.json").read_text())["annotations"] == []
    stored = labelmill.data.open(out).read("labels", columns=["key", "class_name"]).to_pylist()
    coco = COCO(str(tmp_path / "v2" / "gt" / "instances_00000.json"))
    got = sorted((coco.imgs[a["image_id"]]["key"], coco.cats[a["category_id"]]["name"])
                 for a in coco.dataset["annotations"])
    assert got == sorted((r["key"], r["class_name"]) for r in stored)


def _yolo(dest) -> tuple[dict, dict[str, set[str]]]:
    names = yaml.safe_load((dest / "data.yaml").read_text())["names"]
    classes = {}
    for f in (dest / "labels").rglob("*.txt"):
        classes[f.stem] = {names[int(ln.split()[0])] for ln in f.read_text().splitlines()}
    return names, classes


def test_yolo_numbers_are_the_same_in_every_version_and_with_classes(two_versions, tmp_path):
    root, out = two_versions
    assert _cli("export-yolo", out, tmp_path / "v1", "--version", "1", "--images", "none") == 0
    assert _cli("export-yolo", out, tmp_path / "v2", "--images", "none") == 0
    assert _cli("export-yolo", out, tmp_path / "some", "--classes", "sky", "--images", "none") == 0
    n1, c1 = _yolo(tmp_path / "v1")
    n2, c2 = _yolo(tmp_path / "v2")
    ns, cs = _yolo(tmp_path / "some")
    assert n1 == n2 == ns == dict(enumerate(VOCAB))  # the first vocabulary's order: number = class id
    stored: dict[str, set[str]] = {}
    for r in labelmill.data.open(out).read("labels", columns=["key", "class_name"]).to_pylist():
        stored.setdefault(r["key"], set()).add(r["class_name"])
    assert c2 == {k: stored.get(k, set()) for k in c2} and set(c2) == {f"a{i}" for i in range(4)} | {"b0", "b1", "b2"}
    assert c1 == {k: v for k, v in c2.items() if k.startswith("a")}
    assert cs == {k: v & {"sky"} for k, v in c2.items()}


def read_odvg_like_mmdet(dest, label_map_file: str | None) -> list[dict]:
    """The rules of mmdet 3.3's ODVGDataset.load_data_list, written from its behaviour: image path =
    img prefix + filename; OD mode (a label map given) reads detection.instances (label -> label map key);
    VG mode reads grounding.regions; boxes x1y1x2y2, those outside the image or under 1 px dropped."""
    label_map = json.loads((dest / label_map_file).read_text()) if label_map_file else None
    out = []
    for line in (dest / ("detection.jsonl" if label_map else "grounding.jsonl")).read_text().splitlines():
        data = json.loads(line)
        info = {"img_path": dest / "images" / data["filename"], "height": data["height"], "width": data["width"]}
        items = data["detection"]["instances"] if label_map else data["grounding"]["regions"]
        instances = []
        for i, obj in enumerate(items):
            x1, y1, x2, y2 = obj["bbox"]
            inter_w = max(0, min(x2, data["width"]) - max(x1, 0))
            inter_h = max(0, min(y2, data["height"]) - max(y1, 0))
            if inter_w * inter_h == 0 or (x2 - x1) < 1 or (y2 - y1) < 1:
                continue
            label = label_map[str(obj["label"])] if label_map else obj["phrase"]
            instances.append({"bbox": [x1, y1, x2, y2], "label": label})
        info["instances"] = instances
        out.append(info)
    return out


def test_odvg_detection_mode_loads_by_mmdet_rules_with_stable_labels(two_versions, tmp_path):
    root, out = two_versions
    dest = tmp_path / "odvg"
    assert _cli("export-odvg", out, dest) == 0  # class labels only: detection mode
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["mode"] == "detection" and manifest["files"]["label_map"] == "label_map.json"
    assert json.loads((dest / "label_map.json").read_text()) == {str(i): n for i, n in enumerate(VOCAB)}
    data = read_odvg_like_mmdet(dest, "label_map.json")
    stored = labelmill.data.open(out).read("labels", columns=["key", "class_name", "bbox", "image_width"]).to_pylist()
    assert len(data) == 7 and sum(len(d["instances"]) for d in data) == len(stored)
    want = sorted((f"{r['key']}.jpg", r["class_name"], tuple(round(v, 2) for v in (
        r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]))) for r in stored)
    got = sorted((d["img_path"].name, i["label"], tuple(i["bbox"])) for d in data for i in d["instances"])
    assert got == want
    for d in data:
        assert d["img_path"].is_file()  # the image ships under DEST/images with its real name
    # version 1 and --classes: the same numbers
    assert _cli("export-odvg", out, tmp_path / "v1", "--version", "1", "--classes", "gizmo", "--images", "none") == 0
    assert json.loads((tmp_path / "v1" / "label_map.json").read_text()) == {str(i): n for i, n in enumerate(VOCAB)}
    labels = {json.dumps(i["label"]) for ln in (tmp_path / "v1" / "detection.jsonl").read_text().splitlines()
              for i in json.loads(ln)["detection"]["instances"]}
    assert labels == {"2"}


def test_export_odvg_errors_are_one_line_with_exit_codes(two_versions, tmp_path, capsys):
    root, out = two_versions
    assert _cli("export-odvg", out, tmp_path / "a", "--teacher", "nope") == 2
    assert "no labels from teacher(s) ['nope']" in capsys.readouterr().err
    assert _cli("export-odvg", out, tmp_path / "b", "--mode", "grounding") == 2
    assert "try --mode detection" in capsys.readouterr().err
    assert _cli("export-odvg", out, tmp_path / "c", "--threshold", "0.95") == 6  # every box below: nothing
    assert "nothing to export" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # no half-written export
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    assert _cli("export-odvg", out, tmp_path / "d", "--images", "none") == 5  # exists: --overwrite to replace
    assert (tmp_path / "d" / "keep.txt").read_text() == "x"
    assert _cli("export-odvg", out, tmp_path / "d", "--images", "none", "--overwrite") == 0
    assert (tmp_path / "d" / "detection.jsonl").is_file()
