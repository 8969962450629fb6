"""Write stage: runs on the workers, writes every table's Parquet files, returns manifests.

For each batch it turns the rows into the stored tables of the registry
(``labelmill.schemas.tables.tables_emitted_by("write")``: labels, regions,
samples), writes one file per (table, shard) into that table's
``_staging/`` folder of the output (local or ``s3://``, through fsspec) and
returns one small manifest row per shard (:data:`MANIFEST`): the files,
the sample indices it covers and status counts.  Only those rows reach the
driver, which commits groups of complete shards
(:meth:`labelmill.store.commit.OutputStore.commit`).  Nothing here imports
torch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelmill.schemas.tables import (
    COUNTED_DROPS,
    LABELS,
    MANIFEST,
    SAMPLES,
    Col,
    conform,
    counts_of_samples,
    regions_schema,
    status_of,
    tables_emitted_by,
)
from labelmill.stages.base import Resources, Stage
from labelmill.store.yields import ScoreHist

PROVENANCE_COLUMNS = ("teacher_type", "weights", "weights_sha256", "teacher_config_hash")


class WriteTables(Stage):
    """Rows with labels -> staged Parquet files per table and shard -> manifest rows."""

    name = "write"
    role = "write"
    requires = (
        Col.KEY, Col.SHARD, Col.INDEX, Col.ERROR, Col.WARNINGS, Col.CAPTION, Col.ORIG_H, Col.ORIG_W,
        Col.META_JSON, Col.LABELS, Col.REGIONS, Col.PROVENANCE,
    ) + COUNTED_DROPS
    produces = tuple(MANIFEST.names)
    replaces_columns = True  # its output is the manifest, not the input rows

    def __init__(self, output: str, storage_options: dict[str, Any] | None, compression: str,
                 config_hash: str, run_id: str, version: str):
        self.output = output
        self.storage_options = storage_options or {}
        self.compression = compression
        self.config_hash = config_hash
        self.run_id = run_id
        self.version = version
        self.store = None
        self._prov_cache: dict[str, dict] = {}

    def resources(self) -> Resources:
        return Resources(cpus=0)

    def setup(self) -> None:
        from labelmill.store.commit import OutputStore

        self.store = OutputStore(self.output, self.storage_options, self.compression)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.store is None:
            self.setup()
        out = []
        shards = batch.column(Col.SHARD)
        for shard in pc.unique(shards).to_pylist():
            rows = batch.filter(pc.equal(shards, shard)).sort_by([(Col.INDEX, "ascending")])
            files = []
            tables = {spec.name: self.build(spec.name, rows) for spec in tables_emitted_by("write")}
            for name, table in tables.items():
                if table is not None and table.num_rows:
                    files.append(self.store.stage_table(name, table))
            counts = counts_of_samples(tables["samples"])
            out.append({"shard": shard, "indices": rows.column(Col.INDEX).to_pylist(), "files": files, **counts,
                        "score_hist": self.score_hist(rows)})
        return pa.Table.from_pylist(out, schema=MANIFEST)

    @staticmethod
    def score_hist(rows: pa.Table) -> str | None:
        """The rows' pre-filter score histograms (None when no filter stage recorded scores)."""
        if Col.PREFILTER_SCORES not in rows.column_names:
            return None
        hist = ScoreHist()
        errors = rows.column(Col.ERROR).to_pylist()
        for err, entries in zip(errors, rows.column(Col.PREFILTER_SCORES).to_pylist()):
            if err is None:  # a failed sample keeps no labels
                hist.add_image((e["teacher"], e["class_name"], e["score"], e["eligible"]) for e in entries or [])
        return hist.dumps()

    def build(self, table: str, rows: pa.Table) -> pa.Table | None:
        return getattr(self, f"{table}_table")(rows)

    # ------------------------------------------------------------ tables
    def _provenance(self, text: str | None) -> dict:
        if text is None:
            return {}
        if text not in self._prov_cache:
            self._prov_cache[text] = json.loads(text)
        return self._prov_cache[text]

    def _provenance_cols(self, owners: pa.Table, teacher_names: list[str]) -> dict[str, pa.Array]:
        """The teacher's provenance columns for each output row (the one place they are expanded)."""
        provs = [self._provenance(p) for p in owners.column(Col.PROVENANCE).to_pylist()]
        cols = {"teacher": pa.array(teacher_names, pa.string())}
        for field in PROVENANCE_COLUMNS:
            cols[field] = pa.array([pv[t][field] for pv, t in zip(provs, teacher_names)], pa.string())
        return cols

    def _run_cols(self, n: int) -> dict[str, pa.Array]:
        return {
            "config_hash": pa.array([self.config_hash] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "labelmill_version": pa.array([self.version] * n, pa.string()),
        }

    def samples_table(self, rows: pa.Table) -> pa.Table:
        n = rows.num_rows
        errored = pc.is_valid(rows.column(Col.ERROR))
        width = pc.if_else(errored, pa.scalar(None, pa.int32()), rows.column(Col.ORIG_W))
        height = pc.if_else(errored, pa.scalar(None, pa.int32()), rows.column(Col.ORIG_H))
        teachers = [sorted(self._provenance(p)) for p in rows.column(Col.PROVENANCE).to_pylist()]
        cols = {
            "key": rows.column(Col.KEY),
            "shard": rows.column(Col.SHARD),
            "index": rows.column(Col.INDEX),
            "image_width": width,
            "image_height": height,
            "caption": rows.column(Col.CAPTION),
            "status": status_of(rows),
            "error": rows.column(Col.ERROR),
            "warnings": rows.column(Col.WARNINGS),
            "num_labels": pc.list_value_length(rows.column(Col.LABELS)).fill_null(0).cast(pa.int32()),
            "dropped_low_score": rows.column(Col.DROPPED_LOW_SCORE),
            "dropped_small_area": rows.column(Col.DROPPED_SMALL_AREA),
            "dropped_over_max": rows.column(Col.DROPPED_OVER_MAX),
            "meta_json": rows.column(Col.META_JSON),
            "teachers": pa.array(teachers, pa.list_(pa.string())),
            **self._run_cols(n),
        }
        return conform(pa.table(cols), SAMPLES)

    def labels_table(self, rows: pa.Table) -> pa.Table:
        labels = rows.column(Col.LABELS).combine_chunks()
        parent = pc.list_parent_indices(labels)
        flat = pc.list_flatten(labels)
        if len(flat) == 0:
            return LABELS.empty_table()
        owners = rows.take(parent)
        cols = {name: owners.column(src) for name, src in (
            ("key", Col.KEY), ("shard", Col.SHARD), ("index", Col.INDEX),
            ("image_width", Col.ORIG_W), ("image_height", Col.ORIG_H),
        )}
        for field in ("kind", "class_id", "class_name", "phrase", "tokens_positive", "caption",
                      "score", "bbox", "area", "segmentation", "iscrowd"):
            cols[field] = pc.struct_field(flat, field)
        cols.update(self._provenance_cols(owners, pc.struct_field(flat, "teacher").to_pylist()))
        cols.update(self._run_cols(len(flat)))
        return conform(pa.table(cols), LABELS)

    def regions_table(self, rows: pa.Table) -> pa.Table | None:
        """One row per (image, region teacher); embeddings as fixed-size float16 lists."""
        regions = rows.column(Col.REGIONS).combine_chunks()
        flat = pc.list_flatten(regions)
        if len(flat) == 0:
            return None
        owners = rows.take(pc.list_parent_indices(regions))
        dims = set(pc.unique(pc.struct_field(flat, "dim")).to_pylist())
        if len(dims) > 1:
            raise RuntimeError(f"region embeddings of different widths in one run: {sorted(dims)}")
        dim = int(dims.pop())
        schema = regions_schema(dim)
        boxes = pc.struct_field(flat, "boxes")
        counts = pc.list_value_length(boxes).fill_null(0)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts.to_numpy())]).astype(np.int32))
        emb_values = pc.list_flatten(pc.struct_field(flat, "embeddings"))
        embeddings = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(emb_values, dim))
        # boxes divided by (w, h, w, h) of their image
        box_values = pc.list_flatten(pc.list_flatten(boxes)).to_numpy().reshape(-1, 4)
        per_box = np.repeat(np.arange(len(flat)), counts.to_numpy())
        wh = np.stack([owners.column(Col.ORIG_W).to_numpy(), owners.column(Col.ORIG_H).to_numpy()], 1)
        scale = np.maximum(np.tile(wh, 2)[per_box], 1).astype(np.float32)
        norm = pa.FixedSizeListArray.from_arrays(pa.array((box_values / scale).reshape(-1).astype(np.float32)), 4)
        cols = {
            "key": owners.column(Col.KEY),
            "shard": owners.column(Col.SHARD),
            "index": owners.column(Col.INDEX),
            "image_width": owners.column(Col.ORIG_W),
            "image_height": owners.column(Col.ORIG_H),
            "boxes": boxes,
            "boxes_norm": pa.ListArray.from_arrays(offsets, norm),
            "scores": pc.struct_field(flat, "scores"),
            "sources": pc.struct_field(flat, "sources"),
            "embeddings": embeddings,
            "num_regions": counts.cast(pa.int32()),
            "mode": pc.struct_field(flat, "mode"),
            "model": pc.struct_field(flat, "model"),
            "pixel_scale": pc.struct_field(flat, "pixel_scale"),
        }
        cols.update(self._provenance_cols(owners, pc.struct_field(flat, "teacher").to_pylist()))
        cols.update(self._run_cols(len(flat)))
        return conform(pa.table(cols), schema)
