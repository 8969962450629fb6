"""GLIP self-training: losses, ODVG export, and a tiny student that recalls its teacher's boxes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import make_shards, run_config

import labelmill.data
from labelmill.config import load_config
from labelmill.pipelines.label import run


def tiny_glip_teacher(**kw) -> dict:
    return {"type": "glip", "architecture": "tiny", "tokenizer": "builtin-test", "min_size": 64, "max_size": 128,
            "score_floor": 0.0, "pre_nms_thresh": 0.0, "max_detections_per_image": 2, **kw}


def test_atss_assigns_anchors_inside_the_box_and_loss_backpropagates():
    from labelmill.models.glip import GLIP, GLIPConfig
    from labelmill.models.glip.loss import GroundingTargets, atss_assign, glip_loss

    torch.manual_seed(0)
    model = GLIP(GLIPConfig.tiny())
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    out = model(images, ids, mask)
    box = torch.tensor([[10.0, 8.0, 60.0, 50.0]])
    match = atss_assign(out.anchors, box)
    pos = torch.cat(out.anchors)[match >= 0]
    assert len(pos) > 0
    ctr = (pos[:, :2] + pos[:, 2:]) / 2
    assert ((ctr[:, 0] > 10) & (ctr[:, 0] < 60) & (ctr[:, 1] > 8) & (ctr[:, 1] < 50)).all()
    tmap = torch.zeros(1, 6)
    tmap[0, 2:4] = 1
    targets = [GroundingTargets(box, tmap), GroundingTargets(torch.zeros(0, 4), torch.zeros(0, 6))]
    loss, terms = glip_loss(out, targets, mask)
    assert torch.isfinite(loss) and terms["positives"] == len(pos)
    loss.backward()
    assert model.rpn.head.parameters().__next__().grad is not None


def test_token_map_follows_character_spans():
    from labelmill.training.glip import token_map

    offsets = [(0, 0), (0, 1), (2, 5), (6, 11), (0, 0)]  # [CLS] a red block [SEP]
    m = token_map(offsets, [[[2, 11]], [[0, 1]]], 5)
    assert m.tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]


@pytest.fixture(scope="module")
def glip_labelled(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("glip")
    make_shards(root / "shards", 2, 5)
    run(load_config(run_config(str(root / "shards"), str(root / "out"), teachers=[tiny_glip_teacher()])))
    return root


def test_odvg_export(glip_labelled, tmp_path):
    from labelmill.export.odvg import export_odvg

    dest = tmp_path / "odvg"
    info = export_odvg(str(glip_labelled / "out"), str(dest))
    assert info["mode"] == "grounding" and info["files"] == {"annotations": "grounding.jsonl"}
    assert json.loads((dest / "manifest.json").read_text())["regions"] == info["regions"]
    lines = [json.loads(x) for x in (dest / "grounding.jsonl").read_text().splitlines()]
    assert info["images"] == len(lines) == 10 and info["regions"] == sum(len(r["grounding"]["regions"]) for r in lines)
    for rec in lines:
        assert (dest / "images" / rec["filename"]).is_file()  # the image's real name, shipped with the file
        assert rec["filename"] == rec["key"] + ".jpg"
        cap = rec["grounding"]["caption"]
        for reg in rec["grounding"]["regions"]:
            x1, y1, x2, y2 = reg["bbox"]
            assert x2 >= x1 and y2 >= y1
            assert all(cap[s:e] for s, e in reg["tokens_positive"])
            assert reg["phrase"] == cap[reg["tokens_positive"][0][0]:reg["tokens_positive"][-1][1]]
    # the export is gold data for `train glip` as it is: every record's image is found
    from types import SimpleNamespace

    from labelmill.training.glip import gold_records

    rows = gold_records(SimpleNamespace(path=str(dest / "grounding.jsonl"), images=str(dest / "images"), format=None))
    assert len(rows) == 10 and all(os.path.isfile(r["path"]) for r in rows)


def test_glip_boxes_reach_fiftyone_and_yolo_says_why_not(glip_labelled, tmp_path, capsys):
    from pycocotools.coco import COCO

    from labelmill.cli import main

    out = str(glip_labelled / "out")
    stored = labelmill.data.open(out).read("labels", columns=["key", "phrase", "bbox"]).to_pylist()
    assert stored  # the fixture's GLIP keeps boxes
    dest = tmp_path / "fo"
    assert main(["export-fiftyone", out, str(dest)]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["labels"] == {"glip": "labels/glip.json"} and manifest["grounding_labels"] == ["glip"]
    coco = COCO(str(dest / "labels" / "glip.json"))
    got = sorted((coco.imgs[a["image_id"]]["key"], a["phrase"]) for a in coco.dataset["annotations"])
    assert got == sorted((r["key"], r["phrase"]) for r in stored)
    for img in coco.dataset["images"]:
        assert (dest / "data" / img["file_name"]).is_file() and img["caption"]
    # YOLO needs class ids: GLIP in caption mode has none, and the message names what takes its boxes
    assert main(["export-yolo", out, str(tmp_path / "y"), "--teacher", "glip"]) == 2
    err = capsys.readouterr().err
    assert "phrase-only" in err and "export-odvg" in err and not (tmp_path / "y").exists()
    assert main(["export-yolo", out, str(tmp_path / "y")]) == 2
    assert "no class labels" in capsys.readouterr().err


@pytest.mark.slow
def test_glip_student_recalls_teacher_boxes_and_loads_as_glip_teacher(glip_labelled):
    from torchvision.ops import box_iou

    from labelmill.models.glip import caption_prompt
    from labelmill.pipelines.train import train
    from labelmill.teachers.base import build_teacher, validate_teacher_config
    from labelmill.training.config import load_train_config
    from labelmill.training.evaluate import iter_images
    from labelmill.training.glip import teacher_section

    cfg = {
        # GLIP's recipe (threshold 0.5, 2,000 warm-up steps, EMA 0.999, multistep) is for long runs of a trained
        # teacher: this 120-step run of a random one keeps every box, skips the warm-up and averages over ~10 steps
        "data": {"output": str(glip_labelled / "out"), "min_size": [64], "max_size": 128, "augment": False,
                 "threshold": 0.0},
        "model": {"preset": "tiny", "tokenizer": "builtin-test"},
        "optim": {"optimizer": "adamw", "lr": 2e-3, "max_steps": 120, "batch_size": 5, "schedule": "constant",
                  "weight_decay": 0.0, "warmup_steps": 0, "ema": 0.9},
        "checkpoint": {"path": str(glip_labelled / "runs"), "name": "glip", "every_steps": 120},
    }
    # gold data in the mix at GLIP's rule (auto: 10 gold images x 4 copies against 10 pseudo-labelled): the
    # ODVG export of the same labels, so the mix is exercised end to end without changing what is learnt
    from labelmill.export.odvg import export_odvg

    gold = glip_labelled / "gold"
    if not gold.exists():
        export_odvg(str(glip_labelled / "out"), str(gold))
    cfg["gold"] = [{"path": str(gold / "grounding.jsonl"), "images": str(gold / "images")}]
    result = train(load_train_config("glip", cfg))
    assert result["step"] == 120  # recall was 1.0 at 120 and at 150 steps (2026-12-01)
    student = build_teacher(validate_teacher_config(teacher_section(result["checkpoint"], min_size=64, max_size=128,
                                                                    score_floor=0.0, pre_nms_thresh=0.0)),
                            torch.device("cpu"))
    ds = labelmill.data.open(str(glip_labelled / "out"))
    labels = ds.read("labels", columns=["shard", "key", "bbox", "caption"]).to_pylist()
    by_key = {}
    for r in labels:
        by_key.setdefault((r["shard"], r["key"]), []).append(r)
    hit = total = 0
    for shard, key, image in iter_images(ds, set(by_key)):
        rows = by_key[(shard, key)]
        found = student.predictor.predict([image], [caption_prompt(rows[0]["caption"])])[0]
        want = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in rows)])
        got = torch.as_tensor(found.boxes[:10])
        total += len(want)
        if len(got):
            hit += int((box_iou(want, got).max(1).values >= 0.5).sum())
    assert total > 0 and hit / total >= 0.8, (hit, total)
