"""The labelling pipeline: stages composed for the engine (:mod:`labelmill.engine`), which plans, runs, commits.

read (decode fused in) -> label (actor pool; filter and table writer fused in) -> manifests -> the driver commits
dataset versions; ``run(config)`` resumes from whatever versions the output already holds.
"""

from __future__ import annotations

import sys, time, uuid  # noqa: E401

from labelmill import __version__
from labelmill.config import RunConfig
from labelmill.engine import RANDOM_BANNER, CommitLoop, Engine, Pipeline, RunSummary
from labelmill.io.shards import list_shard_infos
from labelmill.stages.decode import DecodeImages, merge_requests
from labelmill.stages.filter import FilterLabels
from labelmill.stages.label import LabelImages
from labelmill.stages.read import ReadShards
from labelmill.stages.write import WriteTables
from labelmill.store.commit import OutputStore
from labelmill.teachers.base import config_hash


def build_pipeline(cfg: RunConfig, run_id: str = "plan") -> Pipeline:
    request, in_actor = merge_requests([t.image_request() for t in cfg.teachers]), cfg.ray.decode == "actor"
    return Pipeline("label", [
        ReadShards(cfg.input.storage_options, cfg.input.samples_per_block, attempts=cfg.input.read_attempts,
                   backoff_s=cfg.input.read_backoff_s),
        *([] if in_actor else [DecodeImages(request, cfg.input.max_image_pixels)]),
        LabelImages(cfg.teachers, allow_random_init=cfg.allow_random_init, batch_size=cfg.ray.batch_size,
                    device=cfg.ray.device, decode=cfg.ray.decode, request=request,
                    max_pixels=cfg.input.max_image_pixels),
        FilterLabels(cfg.filter),
        WriteTables(cfg.output.path, cfg.output.storage_options, cfg.output.compression, cfg.label_hash(),
                    run_id, __version__),
    ])


def run(cfg: RunConfig, *, stream=None) -> RunSummary:
    stream, started = stream or sys.stderr, time.monotonic()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    shards = list_shard_infos(cfg.input.shards, cfg.input.storage_options)  # all checks before claim()
    store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)
    store.check_writable()
    engine = Engine(cfg.ray, batch_size=cfg.ray.batch_size, progress_interval_s=cfg.progress_interval_s, stream=stream)
    with engine.session(needed=any(s.url not in store.done_shards() for s in shards)):
        store.claim(cfg.model_dump(mode="json"), cfg.label_hash())  # input, output, Ray checked: now write
        repair = store.repair()
        if any(repair.values()):
            print(f"[labelmill] repaired output after an interrupted run: {repair}", file=stream)
        done = store.done_shards()
        todo = [s for s in shards if s.url not in done]
        print(f"[labelmill] {len(shards)} shards, {len(shards) - len(todo)} already committed, {len(todo)} to do "
              f"-> {cfg.output.path}", file=stream)
        if cfg.allow_random_init:
            print(RANDOM_BANNER, file=stream)
        info = {"run_id": run_id, "config_hash": cfg.label_hash(),
                "teacher_hashes": {t.instance_name: config_hash(t.label_dump()) for t in cfg.teachers}}
        loop = CommitLoop(store, cfg.output.commit_every_shards, fingerprints={s.url: s.fingerprint for s in todo},
                          info=info)
        counters = engine.run(build_pipeline(cfg, run_id), [s.url for s in todo], loop)
    summary = RunSummary(run_id, cfg.output.path, cfg.label_hash(), len(shards), len(shards) - len(todo), counters,
                         time.monotonic() - started, engine.describe(), repair, loop.bytes_received)
    store.record_run(run_id, {**summary.as_dict(), "score_hist": loop.score_hist.to_json()})
    return summary
