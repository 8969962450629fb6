"""The filter stage keeps labels by score, area and count, and counts each drop."""

from __future__ import annotations

import pyarrow as pa

from labelmill.config import FilterConfig
from labelmill.schemas.tables import LABEL_STRUCT, Col
from labelmill.stages.filter import FilterLabels, filter_labels


def lab(name, score, area):
    return {"teacher": "t", "kind": "mask", "class_id": 0, "class_name": name, "phrase": None,
            "tokens_positive": None, "caption": None, "score": score, "bbox": [0, 0, 1, 1], "area": area,
            "segmentation": None}


def test_rules_and_reasons():
    cfg = FilterConfig(min_score=0.5, per_class_min_score={"sky": 0.9}, min_area=10, max_labels_per_image=2)
    labels = [lab("cat", 0.4, 100), lab("sky", 0.8, 100), lab("dog", 0.7, 5),
              lab("cat", 0.6, 50), lab("cow", 0.95, 50), lab("sky", 0.95, 20)]
    kept, dropped = filter_labels(labels, cfg)
    assert [(k["class_name"], k["score"]) for k in kept] == [("cow", 0.95), ("sky", 0.95)]
    assert dropped == {Col.DROPPED_LOW_SCORE: 2, Col.DROPPED_SMALL_AREA: 1, Col.DROPPED_OVER_MAX: 1}
    assert len(kept) + sum(dropped.values()) == len(labels)


def test_stage_on_arrow_batch():
    stage = FilterLabels(FilterConfig(min_score=0.5), cpus=0.25)
    batch = pa.table({Col.KEY: ["a", "b"],
                      Col.LABELS: pa.array([[lab("cat", 0.9, 1), lab("cat", 0.1, 1)], []], pa.list_(LABEL_STRUCT))})
    out = stage.process_batch(batch)
    assert [len(x) for x in out.column(Col.LABELS).to_pylist()] == [1, 0]
    assert out.column(Col.DROPPED_LOW_SCORE).to_pylist() == [1, 0]
    assert out.column(Col.KEY).to_pylist() == ["a", "b"]
