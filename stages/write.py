"""Write stage: completed shards -> atomic group commits (runs on the driver).

Rows arrive in any order.  The writer buffers them per shard; a shard is
complete when it has received as many sample rows as its ``shard_end`` row
announced.  Every ``commit_every`` completed shards are turned into the
stored tables and committed through :class:`labelmill.store.commit.OutputStore`.
Only label metadata reaches the driver (images are dropped by the label
stage), so the buffers stay small.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelmill.schemas.records import RowKind, SampleStatus
from labelmill.schemas.tables import (
    LABEL_STRUCT,
    LABELS,
    REGION_STRUCT,
    SAMPLES,
    STATS,
    Col,
    conform,
    regions_schema,
)
from labelmill.store.commit import OutputStore, StagedFile

COUNTED_DROPS = (Col.DROPPED_LOW_SCORE, Col.DROPPED_SMALL_AREA, Col.DROPPED_OVER_MAX)


@dataclass
class RunCounters:
    samples: int = 0
    labelled: int = 0
    no_labels: int = 0
    error: int = 0
    labels_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {c: 0 for c in COUNTED_DROPS})
    shards_committed: int = 0
    commits: int = 0

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "labelled": self.labelled,
            "no_labels": self.no_labels,
            "error": self.error,
            "labels_kept": self.labels_kept,
            "dropped": {k.removeprefix("dropped_"): v for k, v in self.dropped.items()},
            "shards_committed": self.shards_committed,
            "commits": self.commits,
        }


class CommitWriter:
    name = "write"
    requires = (
        Col.KEY, Col.SHARD, Col.INDEX, Col.KIND, Col.SHARD_ROWS, Col.ERROR, Col.WARNINGS, Col.CAPTION,
        Col.ORIG_H, Col.ORIG_W, Col.META_JSON, Col.LABELS, Col.REGIONS, Col.PROVENANCE,
    ) + COUNTED_DROPS
    produces: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    def __init__(self, store: OutputStore, commit_every: int, config_hash: str, run_id: str, version: str):
        self.store = store
        self.commit_every = commit_every
        self.config_hash = config_hash
        self.run_id = run_id
        self.version = version
        self.buffers: dict[str, list[pa.Table]] = defaultdict(list)
        self.region_files: dict[str, list[StagedFile]] = defaultdict(list)  # spilled, uncommitted
        self.received: dict[str, int] = defaultdict(int)
        self.seen: dict[str, set[int]] = defaultdict(set)  # row indices per shard, to drop replays
        self.expected: dict[str, int] = {}
        self.complete: list[str] = []
        self.counters = RunCounters()   # rows seen this run (committed or buffered)
        self.committed = RunCounters()  # rows committed this run
        self.done: set[str] = set()
        self.next_commit = store.next_commit()
        self._group_started = time.monotonic()
        self._prov_cache: dict[str, dict] = {}

    # ------------------------------------------------------------ intake
    def add(self, batch: pa.Table) -> None:
        kinds = batch.column(Col.KIND)
        ends = batch.filter(pc.equal(kinds, RowKind.SHARD_END.value))
        rows = batch.filter(pc.equal(kinds, RowKind.SAMPLE.value))
        if rows.num_rows:
            shards = rows.column(Col.SHARD)
            for shard in pc.unique(shards).to_pylist():
                part = rows.filter(pc.equal(shards, shard))
                part = self._drop_replays(shard, part)
                if part.num_rows == 0:
                    continue
                self._count(part, self.counters)
                self.buffers[shard].append(self._spill_regions(shard, part))
                self.received[shard] += part.num_rows
                self._check(shard)
        for shard, n in zip(ends.column(Col.SHARD).to_pylist(), ends.column(Col.SHARD_ROWS).to_pylist()):
            if shard in self.done:
                continue
            self.expected[shard] = int(n)
            self._check(shard)
        while len(self.complete) >= self.commit_every:
            group, self.complete = self.complete[: self.commit_every], self.complete[self.commit_every :]
            self._commit(group)

    def _drop_replays(self, shard: str, part: pa.Table) -> pa.Table:
        """Rows of a shard already received (a retried Ray task replays them) are dropped."""
        if shard in self.done:
            return part.slice(0, 0)
        seen = self.seen[shard]
        idx = part.column(Col.INDEX).to_pylist()
        fresh = [i not in seen for i in idx]
        seen.update(idx)
        return part if all(fresh) else part.filter(pa.array(fresh))

    def _spill_regions(self, shard: str, part: pa.Table) -> pa.Table:
        """Stage the part's region embeddings now; buffer the row without them.

        Embeddings are hundreds of KB per image, so holding them until a
        shard completes would make the writer's memory grow with shard size.
        """
        regions = self.regions_table(part)
        if regions is None:
            return part
        self.region_files[shard].append(self.store.stage_regions(regions, shard))
        empty = pa.array([[] for _ in range(part.num_rows)], part.schema.field(Col.REGIONS).type)
        return part.set_column(part.schema.get_field_index(Col.REGIONS), Col.REGIONS, empty)

    def _check(self, shard: str) -> None:
        exp = self.expected.get(shard)
        if exp is not None and self.received[shard] == exp and shard not in self.complete:
            self.complete.append(shard)
        elif exp is not None and self.received[shard] > exp:
            raise RuntimeError(f"shard {shard} produced {self.received[shard]} rows but announced {exp}")

    def finish(self) -> RunCounters:
        if self.complete:
            self._commit(self.complete)
            self.complete = []
        pending = sorted(s for s in set(self.buffers) | set(self.expected) if s not in self.done)
        if pending:
            raise RuntimeError(f"stream ended with incomplete shards: {pending[:5]}")
        return self.committed

    # ------------------------------------------------------------ tables
    @staticmethod
    def _status(rows: pa.Table) -> pa.Array:
        has_error = pc.is_valid(rows.column(Col.ERROR))
        n_labels = pc.list_value_length(rows.column(Col.LABELS)).fill_null(0)
        labelled = pc.greater(n_labels, 0)
        return pc.if_else(
            has_error,
            SampleStatus.ERROR.value,
            pc.if_else(labelled, SampleStatus.LABELLED.value, SampleStatus.NO_LABELS.value),
        )

    def _count(self, rows: pa.Table, into: RunCounters) -> None:
        status = self._status(rows).to_pylist()
        into.samples += len(status)
        into.labelled += status.count(SampleStatus.LABELLED.value)
        into.no_labels += status.count(SampleStatus.NO_LABELS.value)
        into.error += status.count(SampleStatus.ERROR.value)
        into.labels_kept += int(pc.sum(pc.list_value_length(rows.column(Col.LABELS)).fill_null(0)).as_py() or 0)
        for col in COUNTED_DROPS:
            into.dropped[col] += int(pc.sum(rows.column(col)).as_py() or 0)

    def _provenance(self, text: str | None) -> dict:
        if text is None:
            return {}
        if text not in self._prov_cache:
            self._prov_cache[text] = json.loads(text)
        return self._prov_cache[text]

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
            "status": self._status(rows),
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
                      "score", "bbox", "area", "segmentation"):
            cols[field] = pc.struct_field(flat, field)
        teacher_names = pc.struct_field(flat, "teacher").to_pylist()
        provs = [self._provenance(p) for p in owners.column(Col.PROVENANCE).to_pylist()]
        for field in ("teacher_type", "weights", "weights_sha256", "teacher_config_hash"):
            cols[field] = pa.array([pv[t][field] for pv, t in zip(provs, teacher_names)], pa.string())
        cols["teacher"] = pa.array(teacher_names, pa.string())
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
        }
        teacher_names = pc.struct_field(flat, "teacher").to_pylist()
        provs = [self._provenance(p) for p in owners.column(Col.PROVENANCE).to_pylist()]
        cols["teacher"] = pa.array(teacher_names, pa.string())
        for field in ("teacher_type", "weights", "weights_sha256", "teacher_config_hash"):
            cols[field] = pa.array([pv[t][field] for pv, t in zip(provs, teacher_names)], pa.string())
        cols.update(self._run_cols(len(flat)))
        return conform(pa.table(cols), schema)

    # ------------------------------------------------------------ commit
    def _commit(self, shards: list[str]) -> None:
        parts = [t for s in shards for t in self.buffers[s]]
        rows = pa.concat_tables(parts) if parts else empty_rows()
        rows = rows.sort_by([(Col.SHARD, "ascending"), (Col.INDEX, "ascending")])
        group = RunCounters()
        self._count(rows, group)
        samples = self.samples_table(rows)
        labels = self.labels_table(rows)
        regions = [f for s in shards for f in self.region_files.get(s, [])]
        elapsed = time.monotonic() - self._group_started
        stats = pa.table(
            {
                "run_id": [self.run_id],
                "commit": [self.next_commit],
                "committed_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
                "shards": [sorted(shards)],
                "samples": [group.samples],
                "labelled": [group.labelled],
                "no_labels": [group.no_labels],
                "error": [group.error],
                "labels_kept": [group.labels_kept],
                "dropped_low_score": [group.dropped[Col.DROPPED_LOW_SCORE]],
                "dropped_small_area": [group.dropped[Col.DROPPED_SMALL_AREA]],
                "dropped_over_max": [group.dropped[Col.DROPPED_OVER_MAX]],
                "seconds": [elapsed],
                "config_hash": [self.config_hash],
            }
        )
        self.store.commit_group(
            self.next_commit, shards, samples, labels, regions, conform(stats, STATS),
            info={"run_id": self.run_id, "config_hash": self.config_hash},
        )
        self.next_commit += 1
        self._group_started = time.monotonic()
        for s in shards:
            self.buffers.pop(s, None)
            self.region_files.pop(s, None)
            self.received.pop(s, None)
            self.expected.pop(s, None)
            self.seen.pop(s, None)
        self.done.update(shards)
        self.committed.samples += group.samples
        self.committed.labelled += group.labelled
        self.committed.no_labels += group.no_labels
        self.committed.error += group.error
        self.committed.labels_kept += group.labels_kept
        for k, v in group.dropped.items():
            self.committed.dropped[k] += v
        self.committed.shards_committed += len(shards)
        self.committed.commits += 1


def empty_rows() -> pa.Table:
    """The writer's input for a group of shards that held no samples at all."""
    return pa.table(
        {
            Col.KEY: pa.array([], pa.string()),
            Col.SHARD: pa.array([], pa.string()),
            Col.INDEX: pa.array([], pa.int64()),
            Col.KIND: pa.array([], pa.string()),
            Col.ERROR: pa.array([], pa.string()),
            Col.WARNINGS: pa.array([], pa.list_(pa.string())),
            Col.CAPTION: pa.array([], pa.string()),
            Col.ORIG_H: pa.array([], pa.int32()),
            Col.ORIG_W: pa.array([], pa.int32()),
            Col.META_JSON: pa.array([], pa.string()),
            Col.LABELS: pa.array([], pa.list_(LABEL_STRUCT)),
            Col.REGIONS: pa.array([], pa.list_(REGION_STRUCT)),
            Col.PROVENANCE: pa.array([], pa.string()),
            **{c: pa.array([], pa.int32()) for c in COUNTED_DROPS},
        }
    )
