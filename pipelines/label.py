"""The labelling pipeline: read -> decode -> label -> filter -> write.

::

    shards ──ReadShards──▶ bytes ──DecodeImages──▶ pixels ──LabelImages──▶ labels
           (Ray tasks)           (Ray tasks)              (actor pool, GPU/CPU)
                                          ──FilterLabels──▶ kept labels ──CommitWriter──▶ tables
                                            (Ray tasks)                   (driver, atomic groups)

``run(config)`` is the whole job: it resumes from whatever the output folder
already committed.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass

from labelmill import __version__
from labelmill.config import RunConfig
from labelmill.engine.runtime import Progress, ResourcePlan, configure_ray_data, default_budget_mb, plan_resources, start_ray
from labelmill.io.shards import list_shards
from labelmill.stages.base import apply_stages, check_contract, fuse
from labelmill.stages.decode import DecodeImages, merge_requests
from labelmill.stages.filter import FilterLabels
from labelmill.stages.label import LabelImages
from labelmill.stages.read import ReadShards
from labelmill.stages.write import CommitWriter, RunCounters
from labelmill.store.commit import OutputStore


@dataclass
class RunSummary:
    run_id: str
    output: str
    config_hash: str
    shards_total: int
    shards_skipped: int
    counters: RunCounters
    seconds: float
    plan: str
    repair: dict

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "output": self.output,
            "config_hash": self.config_hash,
            "shards_total": self.shards_total,
            "shards_skipped_already_committed": self.shards_skipped,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.counters.samples / self.seconds, 3) if self.seconds else None,
            "plan": self.plan,
            "repair": self.repair,
            **self.counters.as_dict(),
        }


def build_stages(cfg: RunConfig, plan: ResourcePlan):
    """The stage objects of a run, in order (source first)."""
    read = ReadShards(cfg.input.storage_options, cfg.input.samples_per_block, plan.read_cpus)
    decode = DecodeImages(
        merge_requests([t.image_request() for t in cfg.teachers]), cfg.input.max_image_pixels, plan.read_cpus
    )
    label = LabelImages(
        cfg.teachers,
        allow_random_init=cfg.allow_random_init,
        batch_size=cfg.ray.batch_size,
        cpus=plan.cpus_per_actor,
        gpus=plan.gpus_per_actor,
        torch_threads=plan.torch_threads,
        device=cfg.ray.device,
    )
    filt = FilterLabels(cfg.filter, plan.cpus_per_actor)
    return read, [decode, label, filt]


def dataset(read: ReadShards, stages, urls: list[str], cfg: RunConfig, plan: ResourcePlan):
    import ray.data

    # The read tasks stream a whole shard each; decoding runs in the same tasks
    # (same concurrency and CPUs, so Ray fuses the two operators): no extra
    # hop, and one long-lived worker per reader instead of a process per block.
    tasks = plan.read_tasks
    ds = ray.data.read_datasource(
        read.datasource(urls), override_num_blocks=len(urls), concurrency=tasks, **read.resources().ray_args()
    )
    for group in fuse(stages):  # decode | label+filter (the filter runs inside the label actors)
        if group[0].stateful:
            ds = apply_stages(ds, group, batch_size=cfg.ray.batch_size, concurrency=plan.actors)
        else:
            ds = apply_stages(ds, group, batch_size=None, concurrency=tasks)
    return ds


def run(cfg: RunConfig, *, stream=None) -> RunSummary:
    stream = stream or sys.stderr
    started = time.monotonic()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    config_hash = cfg.label_hash()

    store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)
    store.claim(cfg.model_dump(mode="json"), config_hash)
    repair = store.repair()
    if any(repair.values()):
        print(f"[labelmill] repaired output after an interrupted run: {repair}", file=stream)
    urls = list_shards(cfg.input.shards, cfg.input.storage_options)
    done = store.done_shards()
    todo = [u for u in urls if u not in done]
    print(
        f"[labelmill] {len(urls)} shards, {len(urls) - len(todo)} already committed, {len(todo)} to do "
        f"-> {cfg.output.path}",
        file=stream,
    )
    if cfg.allow_random_init:
        print(RANDOM_BANNER, file=stream)

    writer = CommitWriter(store, cfg.output.commit_every_shards, config_hash, run_id, __version__)
    plan_text = "nothing to do"
    if todo:
        started_here, remote = start_ray(cfg.ray)
        import ray

        try:
            res = ray.cluster_resources()
            plan = plan_resources(cfg.ray, res.get("CPU", 0.0), res.get("GPU", 0.0), autoscaling=remote)
            read, stages = build_stages(cfg, plan)
            budget = cfg.ray.object_store_budget_mb or default_budget_mb(
                plan, cfg.ray.batch_size, stages[0].request.max_long_side
            )
            configure_ray_data(plan, budget)
            plan_text = f"{plan.describe()}; object store budget {budget} MB"
            print(f"[labelmill] plan: {plan_text}", file=stream)
            check_contract([read, *stages, writer])
            progress = Progress(cfg.progress_interval_s, len(todo), stream)
            for batch in dataset(read, stages, todo, cfg, plan).iter_batches(
                batch_format="pyarrow", batch_size=None, prefetch_batches=1
            ):
                writer.add(batch)
                progress.update(writer.counters, writer.committed)
            writer.finish()
            progress.update(writer.counters, writer.committed, force=True)
        finally:
            if started_here:
                ray.shutdown()

    summary = RunSummary(
        run_id=run_id,
        output=cfg.output.path,
        config_hash=config_hash,
        shards_total=len(urls),
        shards_skipped=len(urls) - len(todo),
        counters=writer.committed,
        seconds=time.monotonic() - started,
        plan=plan_text,
        repair=repair,
    )
    _record_run(store, summary)
    return summary


def _record_run(store: OutputStore, summary: RunSummary) -> None:
    path = posixpath.join(store.root, "_labelmill", "runs", f"{summary.run_id}.json")
    store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with store.fs.open(path, "w") as fh:
        json.dump(summary.as_dict(), fh, indent=2)


RANDOM_BANNER = """
################################################################################
##  WARNING: RANDOM WEIGHTS.  This run uses randomly initialised teachers.     ##
##  Its labels are meaningless and every row records weights_sha256=random-init.##
##  Use real weights (an open_clip tag or a checkpoint file) for actual labels. ##
################################################################################
"""
