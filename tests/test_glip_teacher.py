"""GLIP as a pipeline teacher: phrase rows, grounding export, vocabulary mode, one decode."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from deltalake import DeltaTable
from pycocotools.coco import COCO

from helpers import encode, photo, run_config, tiny_maskclip
from labelmill.export.coco import export_coco
from labelmill.config import load_config
from labelmill.pipelines.label import build_pipeline, run
from labelmill.io.shards import write_shard
from labelmill.stages.prepare import PrepareInputs
from labelmill.teachers.base import ImageBatch, WeightsError
from labelmill.teachers.glip import GLIPTeacher, GLIPTeacherConfig

CAPTIONS = [
    "Two young dogs playing with a red ball on the green grass.",
    "A man riding a bicycle next to an old bus on the street.",
    "The cat sits on a wooden table near a window.",
    "",  # no caption: no phrase to ground
]


def tiny_glip(**kw) -> dict:
    return {"type": "glip", "architecture": "tiny", "tokenizer": "builtin-test", "min_size": 64, "max_size": 128,
            "score_floor": 0.0, "pre_nms_thresh": 0.0, "max_detections_per_image": 5, **kw}


def test_caption_mode_labels_carry_exact_spans():
    t = GLIPTeacher(GLIPTeacherConfig(**tiny_glip()), torch.device("cpu"), allow_random_init=True)
    imgs = [photo(96, 64, i) for i in range(2)]
    canvas = torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
    for i, a in enumerate(imgs):
        canvas[i, :64, :96] = torch.from_numpy(a)
    batch = ImageBatch(canvas, [(64, 96)] * 2, [(640, 960)] * 2, CAPTIONS[:2], ["a", "b"], [{}, {}])
    outs = t.predict(batch, {})
    assert all(o.labels for o in outs)
    for out, caption in zip(outs, CAPTIONS):
        for lab in out.labels:
            assert lab.kind == "box" and lab.class_id is None and lab.caption == caption
            assert all(caption[s:e] == lab.phrase for s, e in lab.tokens_positive)
            x, y, w, h = lab.bbox
            assert 0 <= x and 0 <= y and x + w <= 960 + 1e-3 and y + h <= 640 + 1e-3
    assert {lab.phrase for lab in outs[0].labels} <= {"young dogs", "a red ball", "the green grass"}


def test_real_glip_needs_weights_and_tokenizer(tmp_path):
    with pytest.raises(WeightsError, match="GLIPModel/GLIP"):
        GLIPTeacher(GLIPTeacherConfig(**tiny_glip()), torch.device("cpu"), allow_random_init=False)
    with pytest.raises(WeightsError, match="does not exist"):
        GLIPTeacher(GLIPTeacherConfig(**tiny_glip(weights=str(tmp_path / "nope.pth"))), torch.device("cpu"))
    with pytest.raises(WeightsError, match="bert-base-uncased"):
        GLIPTeacher(GLIPTeacherConfig(**tiny_glip(tokenizer=str(tmp_path / "no-tokenizer"))), torch.device("cpu"),
                    allow_random_init=True)


def test_glip_and_maskclip_in_one_run_share_one_decode(tmp_path, ray_session):
    samples = []
    for i, caption in enumerate(CAPTIONS * 2):
        members = {"jpg": encode(photo(96, 64, i))}
        if caption:
            members["txt"] = caption.encode()
        samples.append((f"s{i}", members))
    write_shard(str(tmp_path / "shards" / "a.tar"), samples)
    out = str(tmp_path / "out")
    cfg = load_config(run_config(str(tmp_path / "shards"), out, teachers=[tiny_maskclip(), tiny_glip()]))
    decodes = [s for s in build_pipeline(cfg).stages if isinstance(s, PrepareInputs)]
    assert len(decodes) == 1 and decodes[0].request.short_side == 64 and decodes[0].request.max_long_side == 128

    summary = run(cfg)
    assert summary.counters.samples == 8 and summary.counters.error == 0
    labels = DeltaTable(f"{out}/labels").to_pandas()
    assert set(labels.teacher) == {"maskclip", "glip"}
    boxes = labels[labels.teacher == "glip"]
    assert len(boxes) > 0 and boxes.class_id.isna().all()
    for row in boxes.itertuples():
        for s, e in row.tokens_positive:
            assert row.caption[s:e] == row.phrase
    samples_t = DeltaTable(f"{out}/samples").to_pandas()
    no_caption = samples_t[samples_t.caption.isna()]
    assert len(no_caption) == 2
    assert all(any("glip skipped: no caption" in w for w in ws) for ws in no_caption.warnings)

    manifest = export_coco(out, str(tmp_path / "coco"))
    (gpath,) = manifest["files"]["glip"]["grounding"]
    doc = json.loads((tmp_path / "coco" / gpath).read_text())
    assert len(doc["images"]) == 6  # captioned images only
    images = {img["id"]: img for img in doc["images"]}
    assert doc["annotations"]
    for ann in doc["annotations"]:
        caption = images[ann["image_id"]]["caption"]
        assert all(caption[s:e] == ann["phrase"] for s, e in ann["tokens_positive"])
    COCO(str(tmp_path / "coco" / gpath))  # loads as COCO too
    assert "instances" in manifest["files"]["maskclip"] and "instances" not in manifest["files"]["glip"]


def test_vocabulary_mode_exports_plain_coco(tmp_path, ray_session):
    write_shard(str(tmp_path / "shards" / "a.tar"), [(f"v{i}", {"jpg": encode(photo(96, 64, i))}) for i in range(3)])
    out = str(tmp_path / "out")
    vocab = ["dog", "cat", "car", "bus", "ball"]
    cfg = load_config(run_config(str(tmp_path / "shards"), out,
                                 teachers=[tiny_glip(mode="vocabulary", vocabulary=vocab)]))
    run(cfg)
    labels = pd.read_parquet(f"{out}/labels")
    assert len(labels) > 0 and set(labels.class_name) <= set(vocab)
    assert (labels.class_id == labels.class_name.map(vocab.index)).all()
    manifest = export_coco(out, str(tmp_path / "coco"))
    (ipath,) = manifest["files"]["glip"]["instances"]
    coco = COCO(str(tmp_path / "coco" / ipath))
    assert {c["name"] for c in coco.dataset["categories"]} <= set(vocab)
    assert all("segmentation" not in a for a in coco.dataset["annotations"])
    assert "grounding" not in manifest["files"]["glip"]
