"""What a run will cost, measured before it starts (``labelmill run CONFIG --dry-run``).

It plans the run's operators first (``operators``: each Ray operator with
its fused stages and one worker's resources, as the engine will run them;
a plan that cannot run is a config error before anything is timed), lists
the input, reads a few shards spread over the listing (their sample counts
and bytes per sample give the number of samples of the whole input, scaled
by the listed shard sizes), runs the pipeline's own read, prepare, infer,
finish, filter and write stages in this process on a short batch (one
untimed warm-up pass, then a timed one: seconds per image for each teacher
in the device process, and for the host work of the prepare and finish
stages, on this machine), encodes the batch's output tables as the writer
would (bytes per sample and table), and scales everything to the input:

* hours of labelling on the planned cluster (``infer actors`` working in
  parallel, each at the measured speed),
* storage per table,
* GPU-hours (actor-hours times GPUs per actor; zero on a CPU plan).

Nothing is written to the output.  The timing is of this machine: when it
has no GPU and the plan has, the hours are an upper bound (the report says
which device was measured).
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from labelmill.engine.progress import step


def _sample_shards(shards: list, k: int) -> list:
    if len(shards) <= k:
        return list(shards)
    return [shards[round(i * (len(shards) - 1) / (k - 1))] if k > 1 else shards[0] for i in range(k)]


def planned_actors(cfg) -> tuple[int, float, str]:
    """(infer actors, GPUs per actor, where the numbers come from) of the run's plan."""
    r = cfg.ray
    gpus = r.gpus_per_actor if r.gpus_per_actor is not None else (1.0 / r.actors_per_gpu if r.device == "cuda" else None)
    if r.teacher_actors or r.max_actors:
        n = r.teacher_actors or r.max_actors
        if gpus is None:
            gpus = 1.0 / r.actors_per_gpu if r.device != "cpu" and (r.address or _local_gpus()) else 0.0
        return int(n), float(gpus), "config (ray.teacher_actors / ray.max_actors)"
    plan = planned_resources(cfg)
    return plan.max_actors, plan.gpus_per_actor, "this machine's resources (set ray.max_actors for a cluster)"


def planned_resources(cfg, actors: int | None = None):
    """The resource plan the dry run reports: the configured cluster, else this machine's resources.

    A GPU plan the config asks for (``ray.gpus_per_actor``, ``ray.device: cuda``, ``ray.address``) is
    planned as for a cluster that can provide it; otherwise the plan is this machine's, with its checks
    (a plan that cannot run raises :class:`~labelmill.config.ConfigError` here, before any timing)."""
    from labelmill.engine.runtime import plan_resources

    r = cfg.ray
    if actors:
        r = r.model_copy(update={"teacher_actors": actors, "min_actors": None, "max_actors": None})
    wants = r.device != "cpu"
    asks_gpu = wants and (bool(r.gpus_per_actor) or r.device == "cuda" or r.actors_per_gpu > 1)
    cluster = bool(r.address or os.environ.get("RAY_ADDRESS"))
    cpus = float(r.num_cpus or os.cpu_count() or 1)
    gpus = float(_local_gpus())
    if cluster or (asks_gpu and gpus < 1):
        return plan_resources(r, cpus, gpus, autoscaling=True, max_gpus=None, wants_gpu=wants)
    return plan_resources(r, cpus, gpus, wants_gpu=wants)


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


class _Listed:
    """A listed shard: its URL and size (None where the listing gave none)."""

    def __init__(self, url: str, size: int | None):
        self.url, self.size = url, size


def estimate(cfg, pipeline, *, sample_shards: int = 3, batch_images: int | None = None,
             actors: int | None = None, stream=None) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (see the module docstring)."""
    from labelmill.io.shards import list_shard_fingerprints
    from labelmill.schemas.tables import tables_emitted_by

    from labelmill.engine.executor import Engine

    plan = planned_resources(cfg, actors)  # a plan that cannot run fails here, before any timing
    operators = Engine(cfg.ray, batch_size=cfg.ray.batch_size).operators(pipeline, plan)
    read, prepare = pipeline.find(name="read"), pipeline.find(name="prepare")
    infer, finish = pipeline.find(role="model"), pipeline.find(name="finish")
    filt, write = pipeline.find(name="filter"), pipeline.find(role="write")
    listing = list_shard_fingerprints(cfg.input.shards, cfg.input.storage_options)
    shards = [_Listed(url, fp.size) for url, fp in listing.items()]
    picked = _sample_shards(shards, max(1, sample_shards))
    batch_images = batch_images or max(2, min(cfg.ray.batch_size, 8))

    # read the sampled shards: samples per shard and per listed byte
    counts, rows_for_batch = [], []
    with step(f"read {len(picked)} sample shard(s)", total=len(picked), unit="shards", stream=stream) as p:
        for info in picked:
            n = 0
            for block in read.read_blocks(info.url):
                n += block.num_rows
                if sum(b.num_rows for b in rows_for_batch) < 2 * batch_images:
                    rows_for_batch.append(block)
            counts.append(n)
            p.advance()
    sampled = sum(counts)
    sizes = [i.size for i in picked]
    if all(s for s in sizes) and all(i.size for i in shards) and sum(sizes):
        total_samples = sampled / sum(sizes) * sum(i.size for i in shards)
        how = "sampled shards' samples per byte x listed bytes"
    else:
        total_samples = sampled / max(len(picked), 1) * len(shards)
        how = "sampled shards' mean samples x shard count"
    rows = pa.concat_tables(rows_for_batch) if rows_for_batch else None
    if rows is None or rows.num_rows == 0:
        raise ValueError("the sampled shards hold no samples")
    warm, timed = rows.slice(0, batch_images), rows.slice(batch_images, batch_images)
    if timed.num_rows == 0:
        warm, timed = rows.slice(0, 1), rows

    with step("load teachers", stream=stream):
        infer.setup()
        finish.setup()
    with step(f"time the teachers on {timed.num_rows} image(s)", stream=stream):
        finish.process_batch(infer.process_batch(prepare.process_batch(warm)))  # warm-up: lazy init, caches
        infer.teacher_seconds.clear()
        t0 = time.perf_counter()
        prepared = prepare.process_batch(timed)
        t1 = time.perf_counter()
        inferred = infer.process_batch(prepared)
        t2 = time.perf_counter()
        labelled = finish.process_batch(inferred)
        t3 = time.perf_counter()
    per_teacher = {name: (sec / n if n else None) for name, (sec, n) in infer.teacher_seconds.items()}
    label_s_per_image = sum(v for v in per_teacher.values() if v)

    # the writer's tables for the timed batch, encoded as the run would store them
    filtered = filt.process_batch(labelled)
    bytes_per_sample = {}
    for spec in tables_emitted_by("write"):
        table = write.build(spec.name, filtered)
        if table is None or table.num_rows == 0:
            bytes_per_sample[spec.name] = 0.0
            continue
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=cfg.output.compression)
        bytes_per_sample[spec.name] = buf.tell() / timed.num_rows

    n_actors, gpus_per_actor, plan_from = planned_actors(cfg)
    if actors:
        n_actors, plan_from = actors, "--actors"
    actor_hours = total_samples * label_s_per_image / 3600
    device = str(getattr(infer, "device", "cpu"))
    return {
        "shards": len(shards),
        "shards_sampled": [i.url for i in picked],
        "samples_in_sampled_shards": counts,
        "samples_estimated": int(round(total_samples)),
        "samples_estimated_from": how,
        "timed_images": timed.num_rows,
        "measured_device": device,
        "seconds_per_image": {k: (round(v, 6) if v is not None else None) for k, v in per_teacher.items()},
        "seconds_per_image_all_teachers": round(label_s_per_image, 6),
        "prepare_seconds_per_image": round((t1 - t0) / timed.num_rows, 6),
        "infer_seconds_per_image": round((t2 - t1) / timed.num_rows, 6),
        "finish_seconds_per_image": round((t3 - t2) / timed.num_rows, 6),
        "operators": operators,
        "cluster": {"label_actors": n_actors, "gpus_per_actor": gpus_per_actor, "from": plan_from},
        "hours": round(actor_hours / max(n_actors, 1), 4),
        "actor_hours": round(actor_hours, 4),
        "gpu_hours": round(actor_hours * gpus_per_actor, 4),
        "storage_bytes": {name: int(round(b * total_samples)) for name, b in bytes_per_sample.items()},
        "storage_bytes_total": int(round(sum(bytes_per_sample.values()) * total_samples)),
        "bytes_per_sample": {name: round(b, 1) for name, b in bytes_per_sample.items()},
        "note": ("timed on a CPU; a GPU plan will run faster than these hours say"
                 if device == "cpu" and gpus_per_actor > 0 else ""),
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} PB"


def format_estimate(e: dict[str, Any]) -> str:
    c = e["cluster"]
    lines = [
        f"input: {e['shards']:,} shards, about {e['samples_estimated']:,} samples "
        f"({e['samples_estimated_from']}; sampled {len(e['shards_sampled'])}: {e['samples_in_sampled_shards']})",
        f"speed on this machine ({e['measured_device']}, {e['timed_images']} images timed):",
    ]
    for name, v in e["seconds_per_image"].items():
        lines.append(f"  {name:<16} {v:.4f} s/image" if v is not None else f"  {name:<16} (no image ran)")
    lines.append(f"  prepare (host)   {e['prepare_seconds_per_image']:.4f} s/image")
    lines.append(f"  finish (host)    {e['finish_seconds_per_image']:.4f} s/image")
    lines.append(f"plan: {c['label_actors']} infer actor(s) x {c['gpus_per_actor']:g} GPU ({c['from']})")
    for op in e["operators"]:
        res = ", ".join(f"{k} {v:g}" for k, v in op["resources"].items() if v)
        pool = (f"{op['actors']['min']}..{op['actors']['max']} actor(s)" if op["kind"] == "actors"
                else f"up to {op['concurrency']} task(s)")
        lines.append(f"  operator {op['name']:<8} [{', '.join(op['stages'])}] {pool} x [{res}]")
    lines.append(f"time: {e['hours']:.2f} h on that plan ({e['actor_hours']:.2f} actor-hours), "
                 f"{e['gpu_hours']:.2f} GPU-hours")
    lines.append("storage: " + ", ".join(f"{k} {_size(v)}" for k, v in e["storage_bytes"].items())
                 + f" (total {_size(e['storage_bytes_total'])})")
    if e["note"]:
        lines.append(f"note: {e['note']}")
    return "\n".join(lines)
