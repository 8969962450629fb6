"""The streamed training data path: a pinned dataset version -> Ray Data -> Ray Train.

Nothing is materialised.  The driver lists the version's shards (one column
of the samples table, streamed); a Ray Data ``flat_map`` task per shard
reads that shard's label rows from the version (a filtered read) and streams
the original tar, emitting each labelled sample with its image bytes; a
``map_batches`` step decodes, builds targets and augments.  Ray Train hands
each worker its share with ``get_dataset_shard``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow.compute as pc

import labelmill.data
from labelmill.training.errors import NoUsableLabels, VocabularyMismatch

if TYPE_CHECKING:  # the read tasks import this module: the config models would bring torch with them
    from labelmill.training.config import DataSection

LABEL_COLUMNS = ["key", "class_id", "class_name", "phrase", "tokens_positive", "caption", "score", "bbox",
                 "segmentation"]


def open_version(data: DataSection):
    """The pinned dataset version, or a clear error."""
    try:
        return labelmill.data.open(data.output, data.version, storage_options=data.storage_options or None)
    except LookupError as exc:
        raise NoUsableLabels(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@dataclass
class LabelSummary:
    """What a version holds for one label kind (streamed over two columns)."""

    teacher: str
    rows: int
    classes: dict[int, str]  # class id -> name, as stored
    images: int = 0  # images with at least one usable label of ``teacher``


def summarise_labels(ds, kind: str, teacher: str | None, threshold: float) -> LabelSummary:
    """Pick the teacher whose labels to learn and check that some are usable.

    Streams the labels shard by shard (``DatasetVersion.iter_shards``), so
    counting the distinct labelled images holds one shard's keys at a time."""
    per_teacher: Counter = Counter()
    images: Counter = Counter()
    classes: dict[str, dict[int, str]] = {}
    columns = ["teacher", "kind", "score", "class_id", "class_name", "shard", "key"]
    for _, rows_of_shard in ds.iter_shards("labels", columns):
        keys: dict[str, set] = {}
        for batch in rows_of_shard.to_batches(max_chunksize=65536):
            keep = pc.and_(pc.equal(batch.column("kind"), kind), pc.greater_equal(batch.column("score"), threshold))
            rows = batch.filter(keep).to_pydict()
            for t, cid, name, shard, key in zip(rows["teacher"], rows["class_id"], rows["class_name"],
                                                rows["shard"], rows["key"]):
                per_teacher[t] += 1
                keys.setdefault(t, set()).add((shard, key))
                if cid is not None:
                    seen = classes.setdefault(t, {})
                    if seen.setdefault(cid, name) != name:
                        raise VocabularyMismatch(
                            f"teacher {t!r} stores class id {cid} as both {seen[cid]!r} and {name!r}")
        for t, found in keys.items():
            images[t] += len(found)
    if teacher is None:
        if len(per_teacher) > 1:
            raise NoUsableLabels(f"version {ds.version} of {ds.output} has {kind} labels of several teachers "
                                 f"{sorted(per_teacher)}: name one with data.teacher")
        teacher = next(iter(per_teacher), None)
    if teacher is None or per_teacher[teacher] == 0:
        raise NoUsableLabels(
            f"version {ds.version} of {ds.output} has no usable {kind} labels"
            + (f" of teacher {teacher!r}" if teacher else "")
            + f" at score >= {threshold} (labels per teacher: {dict(per_teacher) or 'none'})")
    return LabelSummary(teacher, per_teacher[teacher], classes.get(teacher, {}), images[teacher])


#: at most this many shard items in one Ray Data iteration when ``repeat`` is auto (a tiny set trained
#: for very many steps restarts its stream now and then instead of listing millions of items)
MAX_AUTO_ITEMS = 100_000


def samples_needed(optim, scaling) -> int:
    """Samples the whole run consumes: every worker's micro-batches of every step."""
    return optim.max_steps * optim.batch_size * optim.grad_accum * scaling.num_workers


def passes(data: DataSection, optim, scaling, images: int, shards: int) -> int:
    """Passes over the version in one Ray Data iteration: ``data.repeat``, or (auto) enough for
    ``optim.max_steps`` steps of every worker, plus one for ``drop_last`` and uneven splits."""
    if data.repeat != "auto":
        return int(data.repeat)
    want = math.ceil(samples_needed(optim, scaling) / max(1, images)) + 1
    return max(1, min(want, MAX_AUTO_ITEMS // max(1, shards)))


def version_shards(ds) -> list[str]:
    shards: set[str] = set()
    for batch in ds.iter_batches("samples", columns=["shard"]):
        shards.update(pc.unique(batch.column("shard")).to_pylist())
    return sorted(shards)


_OPEN: dict[tuple, Any] = {}


def shard_samples(item: dict, *, output: str, version: int, storage_options: dict, shard_storage_options: dict,
                  teacher: str, kind: str) -> Iterator[dict]:
    """Ray Data ``flat_map``: the labelled samples of one shard with their image bytes."""
    from labelmill.io.shards import iter_shard

    cache_key = (output, version, json.dumps(storage_options, sort_keys=True))
    ds = _OPEN.get(cache_key)
    if ds is None:
        ds = _OPEN[cache_key] = labelmill.data.open(output, version, storage_options=storage_options or None)
    shard = item["shard"]
    flt = (pc.field("teacher") == teacher) & (pc.field("kind") == kind)
    labels = ds.read_shard("labels", shard, columns=LABEL_COLUMNS, filter=flt)  # only the files that hold it
    labels = [] if labels is None else labels.to_pylist()
    by_key: dict[str, list[dict]] = {}
    for row in labels:
        by_key.setdefault(row.pop("key"), []).append(row)
    samples = ds.read_shard("samples", shard, columns=["key", "caption", "meta_json"])
    samples = [] if samples is None else samples.to_pylist()
    info = {s["key"]: s for s in samples}
    for raw in iter_shard(shard, shard_storage_options or None):
        rows = by_key.get(raw.key)
        if not rows or raw.image is None or raw.error:
            continue
        meta = info.get(raw.key, {})
        yield {"shard": shard, "key": raw.key, "image_bytes": raw.image, "caption": meta.get("caption") or "",
               "meta_json": meta.get("meta_json") or "", "labels_json": json.dumps(rows)}


def sample_dataset(ds, data: DataSection, teacher: str, kind: str, repeat: int = 1):
    """Ray Data dataset of labelled samples (image bytes + label rows), one read task per shard and pass."""
    import ray.data

    shards = version_shards(ds)
    items = [{"shard": s} for s in shards] * repeat
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(
        shard_samples, num_cpus=data.read_cpus,
        fn_kwargs=dict(output=ds.output, version=ds.version, storage_options=data.storage_options,
                       shard_storage_options=data.shard_storage_options, teacher=teacher, kind=kind),
    )


def quiet_ray_data(object_store_mb: int = 256) -> None:
    """No progress bars; a cap on Ray Data's object-store use so memory stays flat."""
    from ray.data import DataContext
    from ray.data._internal.execution.interfaces import ExecutionResources

    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=object_store_mb * 2**20)
    ctx.enable_progress_bars = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def teacher_section(output: str, storage_options: dict, teacher: str) -> tuple[dict, bool]:
    """The run-config section of ``teacher`` in an output, and its allow_random_init."""
    from labelmill.store.commit import OutputStore

    stored = OutputStore(output, storage_options).read_config() or {}
    run = stored.get("config", {})
    for section in run.get("teachers", []):
        if (section.get("name") or section.get("type", "").rsplit(":", 1)[-1].lower()) == teacher:
            return section, bool(run.get("allow_random_init"))
    raise NoUsableLabels(f"{output} records no config for teacher {teacher!r}; cannot rebuild its text classifier")
