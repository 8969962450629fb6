"""Re-apply a stricter filter to a shard's stored labels, without running the teachers.

Used by ``labelmill refresh`` for the shards the planner marks ``refilter``
(:func:`labelmill.store.refresh_plan.filter_reapply` has proved that the
result equals a from-scratch run's rows).  The shard's rows of the current
version are read, today's filter runs over each sample's stored labels
(the same :func:`labelmill.stages.filter.filter_labels` the pipeline uses),
the samples' label and drop counts and status follow, and every table's
rows of the shard are staged again: the refresh commits them in its one
version, in place of the shard's old files.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from labelmill.schemas.tables import COUNT_COLUMNS, SampleStatus, counts_of_samples
from labelmill.stages.filter import filter_labels
from labelmill.store.commit import OutputStore
from labelmill.store.read import DatasetVersion

DROPS = ("dropped_low_score", "dropped_small_area", "dropped_over_max")


def _with(table: pa.Table, name: str, values: Any) -> pa.Table:
    field = table.schema.field(name)
    return table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))


def refilter_shard(store: OutputStore, view: DatasetVersion, shard: str, filter_cfg: Any,
                   run_fields: dict[str, str]) -> dict:
    """Stage ``shard``'s rows with ``filter_cfg`` re-applied; returns its manifest row (``MANIFEST`` as a dict)."""
    tables: dict[str, pa.Table] = {}
    for name in view.table_names():
        if name == "stats":
            continue
        rows = view.read_shard(name, shard)
        if rows is not None:
            tables[name] = rows
    samples = tables["samples"]
    labels = tables.get("labels")
    new_drops: dict[int, dict[str, int]] = {}
    kept_count: dict[int, int] = {}
    if labels is not None and labels.num_rows:
        rows = labels.select(["index", "class_name", "phrase", "score", "area"]).to_pylist()
        by_index: dict[int, list[int]] = {}
        for pos, row in enumerate(rows):
            row["_pos"] = pos
            by_index.setdefault(row["index"], []).append(pos)
        keep: list[int] = []
        for index, positions in by_index.items():
            kept, dropped = filter_labels([rows[p] for p in positions], filter_cfg)
            keep += [lab["_pos"] for lab in kept]
            kept_count[index] = len(kept)
            new_drops[index] = {k: int(v) for k, v in dropped.items()}
        labels = labels.take(pa.array(sorted(keep), pa.int64()))
        for name, value in run_fields.items():
            if name in labels.column_names:
                labels = _with(labels, name, [value] * labels.num_rows)
        tables["labels"] = labels
    index = samples.column("index").to_pylist()
    error = pc.is_valid(samples.column("error")).to_pylist()
    num = [kept_count.get(i, 0) for i in index]
    samples = _with(samples, "num_labels", num)
    for col in DROPS:
        old = samples.column(col).to_pylist()
        samples = _with(samples, col, [int(o or 0) + new_drops.get(i, {}).get(col, 0) for o, i in zip(old, index)])
    status = [SampleStatus.ERROR.value if e else (SampleStatus.LABELLED.value if n else SampleStatus.NO_LABELS.value)
              for e, n in zip(error, num)]
    samples = _with(samples, "status", status)
    for name, value in run_fields.items():
        if name in samples.column_names:
            samples = _with(samples, name, [value] * samples.num_rows)
    tables["samples"] = samples
    files = [store.stage_table(name, table) for name, table in tables.items() if table.num_rows]
    counts = counts_of_samples(samples)
    return {"shard": shard, "indices": index, "files": files, **{c: counts[c] for c in COUNT_COLUMNS}}
