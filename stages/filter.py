"""Filter stage: keep labels by confidence, area and count; count every drop.

Rules, applied in this order to each image's labels:

1. ``score < per_class_min_score[class]`` (or ``min_score`` for classes not
   listed) -> dropped as ``low_score``;
2. ``area < min_area`` -> ``small_area``;
3. beyond the ``max_labels_per_image`` highest-scoring -> ``over_max_per_image``.

Region embeddings are not labels and pass untouched.  Every label's score
before filtering travels on (``prefilter_scores``) for the yield histograms
(:mod:`labelmill.store.yields`); the table writer sums them per shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from labelmill.schemas.tables import LABEL_STRUCT, PREFILTER_STRUCT, Col
from labelmill.stages.base import Resources, Stage
from labelmill.store.yields import image_entries

if TYPE_CHECKING:  # the config module pulls in the teachers (and torch); this stage needs neither
    from labelmill.config import FilterConfig


def filter_labels(labels: list[dict], cfg: "FilterConfig") -> tuple[list[dict], dict[str, int]]:
    """Kept labels and drop counts keyed by the ``Col.DROPPED_*`` columns."""
    dropped = {Col.DROPPED_LOW_SCORE: 0, Col.DROPPED_SMALL_AREA: 0, Col.DROPPED_OVER_MAX: 0}
    kept = []
    for lab in labels:
        name = lab["class_name"]
        if name is None:
            name = lab.get("phrase")
        threshold = cfg.per_class_min_score.get(name, cfg.min_score) if name is not None else cfg.min_score
        if lab["score"] < threshold:
            dropped[Col.DROPPED_LOW_SCORE] += 1
        elif (lab["area"] or 0.0) < cfg.min_area:
            dropped[Col.DROPPED_SMALL_AREA] += 1
        else:
            kept.append(lab)
    if cfg.max_labels_per_image is not None and len(kept) > cfg.max_labels_per_image:
        kept.sort(key=lambda lab: -lab["score"])
        dropped[Col.DROPPED_OVER_MAX] += len(kept) - cfg.max_labels_per_image
        kept = kept[: cfg.max_labels_per_image]
    return kept, dropped


class FilterLabels(Stage):
    name = "filter"
    requires = (Col.LABELS,)
    produces = (Col.LABELS, Col.DROPPED_LOW_SCORE, Col.DROPPED_SMALL_AREA, Col.DROPPED_OVER_MAX,
                Col.PREFILTER_SCORES)

    def __init__(self, config: "FilterConfig", cpus: float = 0.0):
        self.config = config
        self.cpus = cpus

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        kept_all = []
        counts = {c: [] for c in (Col.DROPPED_LOW_SCORE, Col.DROPPED_SMALL_AREA, Col.DROPPED_OVER_MAX)}
        prefilter = []
        for labels in batch.column(Col.LABELS).to_pylist():
            prefilter.append([dict(zip(("teacher", "class_name", "score", "eligible"), e)) for e in image_entries(
                labels or [], self.config.min_area, self.config.max_labels_per_image)])
            kept, dropped = filter_labels(labels or [], self.config)
            kept_all.append(kept)
            for col, value in dropped.items():
                counts[col].append(value)
        out = batch.set_column(
            batch.schema.get_field_index(Col.LABELS), Col.LABELS, pa.array(kept_all, pa.list_(LABEL_STRUCT))
        )
        for col, values in counts.items():
            out = out.append_column(col, pa.array(values, pa.int32()))
        return out.append_column(Col.PREFILTER_SCORES, pa.array(prefilter, pa.list_(PREFILTER_STRUCT)))
