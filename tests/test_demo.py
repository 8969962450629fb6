"""The README's main command: ``labelmill demo`` builds shards, runs, exports, reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from pycocotools.coco import COCO


@pytest.mark.slow  # 75-95 s: three teachers through Ray on the demo photos
def test_demo_with_maskclip_glip_and_vild_end_to_end(tmp_path, ray_session):
    from labelmill.pipelines.demo import DEMO_PHOTOS, run_demo
    from labelmill.store.regions import RegionReader

    result = run_demo(str(tmp_path / "demo"), teachers=["maskclip", "glip", "vild"])
    n = len(DEMO_PHOTOS) + 1  # plus one deliberately truncated JPEG
    s = result["summary"]
    assert s["samples"] == n and s["error"] == 1 and s["labelled"] + s["no_labels"] == n - 1

    samples = DeltaTable(result["output"] + "/samples").to_pandas()
    assert len(samples) == n and samples.key.is_unique
    broken = samples[samples.status == "error"]
    assert broken.key.tolist() == ["9999-broken"] and broken.error.iloc[0]

    labels = DeltaTable(result["output"] + "/labels").to_pandas()
    assert len(labels) == s["labels_kept"] > 0 and set(labels.weights_sha256) == {"random-init"}

    # the random-init GLIP keeps boxes (its scores sit at its bias prior, about 0.01-0.1; no cut in the demo)
    glip = labels[labels.teacher == "glip"]
    assert len(glip) > 0 and (glip.kind == "box").all() and glip.phrase.notna().all()
    assert result["summary"]["notes"] == []  # no teacher kept nothing

    coco_file = tmp_path / "demo" / "coco" / result["coco_files"]["maskclip"]["instances"][0]
    coco = COCO(str(coco_file))
    assert len(coco.getAnnIds()) == (labels.teacher == "maskclip").sum()

    report = (tmp_path / "demo" / "report.html").read_text()
    assert "RANDOM" in report.upper() and "<img" in report

    # ViLD: one region row per decodable image, boxes = the whole image + MaskCLIP's and GLIP's boxes
    reader = RegionReader(result["output"])
    assert sorted(reader.keys()) == sorted(samples.key[samples.status != "error"])
    for key in reader.keys():
        r = reader.get(key)
        row = samples[samples.key == key].iloc[0]
        assert r.boxes[0].tolist() == [0, 0, row.image_width, row.image_height]
        assert set(r.sources) <= {"image", "maskclip", "glip"} and r.sources[0] == "image"
        assert r.meta["mode"] == "dense" and r.meta["model"] == "ViT-B-16"
        assert r.embeddings.shape == (len(r.boxes), 512)
        assert np.allclose(np.linalg.norm(r.embeddings.astype(np.float32), axis=1), 1, atol=3e-3)
    assert len(pd.read_parquet(result["regions"])) == len(reader)
    json.dumps(result)  # the CLI prints it
