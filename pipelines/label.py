"""read -> prepare (CPU) -> infer (device) -> finish (CPU; filter, writer fused in) -> manifests -> the driver
commits dataset versions.  The engine (:mod:`labelmill.engine`) plans, runs, commits; ``run`` resumes an output."""

from __future__ import annotations

import sys, time  # noqa: E401

from labelmill import __version__
from labelmill.config import RunConfig
from labelmill.engine import RANDOM_BANNER, CommitLoop, Engine, Pipeline, RunSummary
from labelmill.engine.run_info import new_run_id, version_info, writer_lock
from labelmill.io.shards import list_shard_fingerprints
from labelmill.stages.filter import FilterLabels
from labelmill.stages.finish import FinishLabels
from labelmill.stages.infer import InferImages
from labelmill.stages.prepare import PrepareInputs, merge_requests
from labelmill.stages.read import ReadShards
from labelmill.stages.write import WriteTables
from labelmill.store.commit import OutputStore


def build_pipeline(cfg: RunConfig, run_id: str = "plan") -> Pipeline:
    request, in_actor = merge_requests([t.image_request() for t in cfg.teachers]), cfg.ray.decode == "actor"
    return Pipeline("label", [
        ReadShards(cfg.input.storage_options, cfg.input.samples_per_block, attempts=cfg.input.read_attempts,
                   backoff_s=cfg.input.read_backoff_s),
        PrepareInputs(request, cfg.input.max_image_pixels, teachers=cfg.teachers, decode=not in_actor),
        InferImages(cfg.teachers, allow_random_init=cfg.allow_random_init, batch_size=cfg.ray.batch_size, device=cfg.ray.device,
                    decode=cfg.ray.decode, request=request, max_pixels=cfg.input.max_image_pixels,
                    concurrent_calls=cfg.ray.infer_calls_per_actor),
        FinishLabels(cfg.teachers),
        FilterLabels(cfg.filter),
        WriteTables(cfg.output.path, cfg.output.storage_options, cfg.output.compression, cfg.label_hash(), run_id, __version__),
    ])


def run(cfg: RunConfig, *, stream=None) -> RunSummary:
    listing = list_shard_fingerprints(cfg.input.shards, cfg.input.storage_options)  # cheap checks first: input,
    store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)  # output, lock;
    store.check_writable()  # then weights and Ray (a failure before the claim leaves nothing behind)
    stream = stream or sys.stderr
    engine = Engine(cfg.ray, batch_size=cfg.ray.batch_size, progress_interval_s=cfg.progress_interval_s, stream=stream)
    with writer_lock(cfg, "run") as lock, engine.session(needed=any(s not in store.done_shards() for s in listing)):
        return _run(cfg, store, listing, lock, engine, stream)


def _run(cfg: RunConfig, store: OutputStore, listing: dict, lock, engine: Engine, stream) -> RunSummary:
    started, run_id = time.monotonic(), new_run_id()
    store.claim(cfg.model_dump(mode="json"), cfg.label_hash())
    repair = store.repair()
    if any(repair.values()): print(f"[labelmill] repaired output after an interrupted run: {repair}", file=stream)  # noqa: E701
    todo = [s for s in listing if s not in store.done_shards()]
    print(f"[labelmill] {len(listing)} shards, {len(listing) - len(todo)} already committed, {len(todo)} to do "
          f"-> {cfg.output.path}", file=stream)
    if cfg.allow_random_init:
        print(RANDOM_BANNER, file=stream)
    info, shard_fields = version_info(cfg, run_id)
    loop = CommitLoop(store, cfg.output.commit_every_shards, fingerprints={s: listing[s].to_dict() for s in todo},
                      info=info, shard_fields=shard_fields, before_commit=lock.ensure_held)
    counters = engine.run(build_pipeline(cfg, run_id), todo, loop)
    summary = RunSummary(run_id, cfg.output.path, cfg.label_hash(), len(listing), len(listing) - len(todo), counters,
                         time.monotonic() - started, engine.describe(), repair, loop.bytes_received)
    summary.say_kept_nothing(cfg, loop.score_hist, stream)
    store.record_run(run_id, {**summary.as_dict(), "score_hist": loop.score_hist.to_json()})
    return summary
