"""Every Arrow schema labelmill reads or writes, defined once.

Two families live here:

* the **stored tables** (``labels``, ``samples``, ``regions``, ``stats``),
  which users read with pandas, DuckDB, Ray Data or deltalake;
* the **in-flight columns**: the names and meaning of the columns that the
  Ray stages pass to each other.  Each stage declares which of these it
  needs and which it adds (see :class:`labelmill.stages.base.Stage`);
* the **table registry** (:data:`TABLES`): every stored table declared once
  with its schema, format, key columns and the stage that emits it.  The
  store, the worker-side writer, the read API and the exports iterate it,
  so adding a table is one declaration;
* the **manifest rows** workers send the driver (:data:`MANIFEST`): which
  files they staged, for which shard and sample indices, and status counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

import pyarrow.compute as pc

from labelmill.schemas.records import Label, RegionSet, SampleStatus

# --------------------------------------------------------------------------
# In-flight columns (between stages)
# --------------------------------------------------------------------------


class Col:
    """Column names of the rows that flow through the stages."""

    # written by the reader
    KEY = "key"                  # sample key inside the shard (webdataset __key__)
    SHARD = "shard"              # shard URL as listed
    INDEX = "index"              # position of the sample in its shard (0-based)
    IMAGE_BYTES = "image_bytes"  # encoded image (null when missing)
    IMAGE_EXT = "image_ext"      # extension the image came with
    CAPTION_BYTES = "caption_bytes"
    META_JSON = "meta_json"      # the sample's .json member, verbatim text
    ERROR = "error"              # reason the sample failed (null if fine)
    WARNINGS = "warnings"        # list of handled oddities (missing caption, ...)
    # written by the decoder
    IMAGE = "image"              # uint8 canvas (S, S, 3), image at top-left
    WORK_H = "work_h"            # valid rows of the canvas
    WORK_W = "work_w"            # valid columns of the canvas
    ORIG_H = "orig_h"            # original height after EXIF rotation
    ORIG_W = "orig_w"
    CAPTION = "caption"
    # written by the label stage
    LABELS = "labels"            # list<LABEL_STRUCT>
    REGIONS = "regions"          # list<REGION_STRUCT>, one entry per region teacher
    PROVENANCE = "provenance"    # JSON: {teacher name: Provenance fields} of the run's teachers
    # written by the filter stage
    DROPPED_LOW_SCORE = "dropped_low_score"
    DROPPED_SMALL_AREA = "dropped_small_area"
    DROPPED_OVER_MAX = "dropped_over_max"
    PREFILTER_SCORES = "prefilter_scores"  # list<PREFILTER_STRUCT>: every label before the filter


DROP_REASONS = {
    Col.DROPPED_LOW_SCORE: "low_score",
    Col.DROPPED_SMALL_AREA: "small_area",
    Col.DROPPED_OVER_MAX: "over_max_per_image",
}

# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

RLE_STRUCT = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

LABEL_STRUCT = pa.struct(
    [
        ("teacher", pa.string()),
        ("kind", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("phrase", pa.string()),
        ("tokens_positive", pa.list_(pa.list_(pa.int32()))),
        ("caption", pa.string()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.float64()),
        ("segmentation", RLE_STRUCT),
        ("iscrowd", pa.bool_()),
    ]
)

PROVENANCE_FIELDS = [
    pa.field("teacher", pa.string()),
    pa.field("teacher_type", pa.string()),
    pa.field("weights", pa.string()),
    pa.field("weights_sha256", pa.string()),
    pa.field("teacher_config_hash", pa.string()),
]

RUN_FIELDS = [
    pa.field("config_hash", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("labelmill_version", pa.string()),
]

SAMPLE_ID_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("index", pa.int64(), nullable=False),
]

IMAGE_SIZE_FIELDS = [
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
]

# --------------------------------------------------------------------------
# Stored tables
# --------------------------------------------------------------------------

#: One row per kept label (mask or box).
LABELS = pa.schema(
    SAMPLE_ID_FIELDS
    + IMAGE_SIZE_FIELDS
    + [
        pa.field("kind", pa.string()),
        pa.field("class_id", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("phrase", pa.string()),
        pa.field("tokens_positive", pa.list_(pa.list_(pa.int32()))),
        pa.field("caption", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("bbox", pa.list_(pa.float32())),
        pa.field("area", pa.float64()),
        pa.field("segmentation", RLE_STRUCT),
        pa.field("iscrowd", pa.bool_()),
    ]
    + PROVENANCE_FIELDS
    + RUN_FIELDS
)

#: One row per input sample, whatever happened to it.
SAMPLES = pa.schema(
    SAMPLE_ID_FIELDS
    + IMAGE_SIZE_FIELDS
    + [
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("warnings", pa.list_(pa.string())),
        pa.field("num_labels", pa.int32()),
        pa.field("dropped_low_score", pa.int32()),
        pa.field("dropped_small_area", pa.int32()),
        pa.field("dropped_over_max", pa.int32()),
        pa.field("meta_json", pa.string()),
        pa.field("teachers", pa.list_(pa.string())),
    ]
    + RUN_FIELDS
)

#: One row per commit: what the group contained and what the filter dropped.
STATS = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("commit", pa.int64()),
        pa.field("committed_at", pa.timestamp("us", tz="UTC")),
        pa.field("shards", pa.list_(pa.string())),
        pa.field("samples", pa.int64()),
        pa.field("labelled", pa.int64()),
        pa.field("no_labels", pa.int64()),
        pa.field("error", pa.int64()),
        pa.field("labels_kept", pa.int64()),
        pa.field("dropped_low_score", pa.int64()),
        pa.field("dropped_small_area", pa.int64()),
        pa.field("dropped_over_max", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("config_hash", pa.string()),
        pa.field("duplicates", pa.int64()),
    ]
)


#: In-flight regions of one image from one teacher.  The embeddings travel
#: as one flat float16 list (regions x dim, row-major) with their width in
#: ``dim``, so no per-value Python objects are ever made.
REGION_STRUCT = pa.struct(
    [
        ("teacher", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("scores", pa.list_(pa.float32())),
        ("sources", pa.list_(pa.string())),
        ("embeddings", pa.list_(pa.float16())),
        ("dim", pa.int32()),
        ("mode", pa.string()),
        ("model", pa.string()),
        ("pixel_scale", pa.float32()),
    ]
)


def regions_schema(dim: int) -> pa.Schema:
    """One row per image: its proposals and their CLIP embeddings (ViLD)."""
    return pa.schema(
        SAMPLE_ID_FIELDS
        + IMAGE_SIZE_FIELDS
        + [
            pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),
            pa.field("boxes_norm", pa.list_(pa.list_(pa.float32(), 4))),
            pa.field("scores", pa.list_(pa.float32())),
            pa.field("sources", pa.list_(pa.string())),
            pa.field("embeddings", pa.list_(pa.list_(pa.float16(), dim))),
            pa.field("num_regions", pa.int32()),
            pa.field("mode", pa.string()),
            pa.field("model", pa.string()),
            # the resolution the embeddings came from, per original pixel: 1.0 is the original
            # file; below 1 the crops (or dense features) were cut from a downscaled copy
            pa.field("pixel_scale", pa.float32()),
        ]
        + PROVENANCE_FIELDS
        + RUN_FIELDS
    )


# --------------------------------------------------------------------------
# The table registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    """One stored table, declared once.

    ``format`` is ``delta`` (a Delta Lake table) or ``parquet`` (plain
    Parquet plus a ``_manifest/`` log, for types Delta cannot express such
    as float16 vectors).  ``key_columns`` identify a row's sample;
    ``emitted_by`` names the stage (or ``commit`` for the driver) that
    writes it.  ``schema`` is a schema or, when a width is only known at run
    time (embedding dimension), a function of the rows' schema.
    """

    name: str
    schema: pa.Schema | Callable[..., pa.Schema]
    format: str
    key_columns: tuple[str, ...]
    emitted_by: str
    partition_by: tuple[str, ...] = ()
    row_group_rows: int = 4096

    @property
    def per_sample(self) -> bool:
        return "shard" in self.key_columns


#: Every stored table.  Order is the commit order (samples last of the
#: worker tables, then stats).
TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("labels", LABELS, "delta", ("shard", "key"), emitted_by="write"),
        # one row per (image, region teacher); small row groups so one image reads alone
        TableSpec("regions", regions_schema, "parquet", ("shard", "key", "teacher"), emitted_by="write",
                  row_group_rows=32),
        TableSpec("samples", SAMPLES, "delta", ("shard", "key"), emitted_by="write"),
        TableSpec("stats", STATS, "delta", ("commit",), emitted_by="commit"),
    )
}


def tables_emitted_by(stage: str) -> list[TableSpec]:
    return [spec for spec in TABLES.values() if spec.emitted_by == stage]


#: Status counts a manifest row carries (summed per commit into ``stats``).
COUNT_COLUMNS = ("samples", "labelled", "no_labels", "error", "labels_kept",
                 "dropped_low_score", "dropped_small_area", "dropped_over_max")

STAGED_FILE = pa.struct(
    [
        ("table", pa.string()),
        ("path", pa.string()),       # relative to the table folder, inside its _staging/
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("stats", pa.string()),      # Delta ``stats`` JSON
    ]
)

#: What a worker-side write sends the driver: one row per (batch, shard).
MANIFEST = pa.schema(
    [pa.field("shard", pa.string()), pa.field("indices", pa.list_(pa.int64())),
     pa.field("files", pa.list_(STAGED_FILE))]
    + [pa.field(c, pa.int64()) for c in COUNT_COLUMNS]
    # pre-filter score histograms of the row's samples (labelmill.store.yields.ScoreHist JSON)
    + [pa.field("score_hist", pa.string())]
)

#: one pre-filter label as the filter saw it (``eligible``: a score threshold alone decides it)
PREFILTER_STRUCT = pa.struct([("teacher", pa.string()), ("class_name", pa.string()),
                              ("score", pa.float32()), ("eligible", pa.bool_())])


# --------------------------------------------------------------------------
# Records -> Arrow
# --------------------------------------------------------------------------


def label_to_struct(label: Label, teacher: str) -> dict:
    """A :class:`Label` as a python dict shaped like ``LABEL_STRUCT``."""
    spans = None
    if label.tokens_positive is not None:
        spans = [[int(a), int(b)] for a, b in label.tokens_positive]
    return {
        "teacher": teacher,
        "kind": label.kind,
        "class_id": label.class_id,
        "class_name": label.class_name,
        "phrase": label.phrase,
        "tokens_positive": spans,
        "caption": label.caption,
        "score": float(label.score),
        "bbox": [float(v) for v in label.bbox],
        "area": float(label.area) if label.area is not None else None,
        "segmentation": label.rle,
        "iscrowd": bool(label.iscrowd),
    }


def region_from_struct(item: dict) -> tuple[str, RegionSet]:
    """One ``REGION_STRUCT`` value (as ``to_pylist`` gives it) back as ``(teacher, RegionSet)``."""
    n = len(item["scores"])
    return item["teacher"], RegionSet(
        boxes=np.asarray(item["boxes"], dtype=np.float32).reshape(n, 4),
        scores=np.asarray(item["scores"], dtype=np.float32),
        sources=list(item["sources"]),
        embeddings=np.asarray(item["embeddings"], dtype=np.float16).reshape(n, int(item["dim"])),
        mode=item["mode"],
        model=item["model"],
        pixel_scale=float(item["pixel_scale"]),
    )


def regions_array(per_row: Sequence[Sequence[tuple[str, RegionSet]]]) -> pa.Array:
    """A ``list<REGION_STRUCT>`` array: for every row, its ``(teacher, RegionSet)`` pairs."""
    items = [item for row in per_row for item in row]
    counts = [len(r.boxes) for _, r in items]
    region_offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    boxes = np.concatenate([r.boxes.reshape(-1, 4) for _, r in items]) if items else np.zeros((0, 4))
    scores = np.concatenate([r.scores.reshape(-1) for _, r in items]) if items else np.zeros(0)
    emb = [np.ascontiguousarray(r.embeddings, dtype=np.float16).reshape(-1) for _, r in items]
    emb_offsets = np.concatenate([[0], np.cumsum([e.size for e in emb])]).astype(np.int32)
    struct = pa.StructArray.from_arrays(
        [
            pa.array([t for t, _ in items], pa.string()),
            pa.ListArray.from_arrays(
                region_offsets,
                pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1).astype(np.float32)), 4),
            ),
            pa.ListArray.from_arrays(region_offsets, pa.array(scores.astype(np.float32))),
            pa.ListArray.from_arrays(region_offsets, pa.array([s for _, r in items for s in r.sources], pa.string())),
            pa.ListArray.from_arrays(
                pa.array(emb_offsets), pa.array(np.concatenate(emb) if emb else np.zeros(0, np.float16))
            ),
            pa.array([int(r.embeddings.shape[1]) for _, r in items], pa.int32()),
            pa.array([r.mode for _, r in items], pa.string()),
            pa.array([r.model for _, r in items], pa.string()),
            pa.array([r.pixel_scale for _, r in items], pa.float32()),
        ],
        fields=list(REGION_STRUCT),
    )
    row_offsets = np.concatenate([[0], np.cumsum([len(row) for row in per_row])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(row_offsets), struct)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder and cast ``table`` to ``schema``; a missing column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} required by the schema")
    return pa.table([table[f.name].cast(f.type) for f in schema], schema=schema)


COUNTED_DROPS = (Col.DROPPED_LOW_SCORE, Col.DROPPED_SMALL_AREA, Col.DROPPED_OVER_MAX)


def status_of(rows: pa.Table) -> pa.Array:
    has_error = pc.is_valid(rows.column(Col.ERROR))
    labelled = pc.greater(pc.list_value_length(rows.column(Col.LABELS)).fill_null(0), 0)
    return pc.if_else(
        has_error,
        SampleStatus.ERROR.value,
        pc.if_else(labelled, SampleStatus.LABELLED.value, SampleStatus.NO_LABELS.value),
    )


def counts_of_samples(samples: pa.Table) -> dict[str, int]:
    """Status and drop counts of rows of the stored ``samples`` table."""
    status = samples.column("status").to_pylist()
    out = {
        "samples": len(status),
        "labelled": status.count(SampleStatus.LABELLED.value),
        "no_labels": status.count(SampleStatus.NO_LABELS.value),
        "error": status.count(SampleStatus.ERROR.value),
        "labels_kept": int(pc.sum(samples.column("num_labels")).as_py() or 0),
    }
    for col in COUNTED_DROPS:
        out[col] = int(pc.sum(samples.column(col)).as_py() or 0)
    return out


def meta_dict(meta_json: str | None) -> dict:
    if not meta_json:
        return {}
    try:
        value = json.loads(meta_json)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
