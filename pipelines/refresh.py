"""The nightly refresh: bring an output up to date with tonight's input and config as ONE new version.

Under the output's writer lock: list tonight's shards with fingerprints,
plan every shard against the current version's state (the latest snapshot of the
version records and the records after it; no table is read,
so a night with nothing to do is cheap: see ``benchmarks/bench_refresh.py``),
label what must be labelled (new, changed, stale), and publish the new rows
together with the removal of changed, deleted and stale shards' old rows as
one dataset version.  A reader sees the previous version or the new one.
A refresh killed at any moment leaves no version behind; the next one
repairs the output and plans again.

Stale shards whose only difference is a filter change the planner proved
re-appliable (``refilter``) are not sent to the teachers: today's filter is
re-applied to their stored labels (:mod:`labelmill.store.refilter`), and
the result joins the same version.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from datetime import datetime, timezone

import pyarrow as pa

from labelmill.config import RunConfig
from labelmill.engine import RANDOM_BANNER, CommitLoop, Engine
from labelmill.exitcodes import EXIT_LOCK_HELD, EXIT_NOTHING_TO_DO, EXIT_PUBLISHED
from labelmill.io.shards import list_shard_fingerprints
from labelmill.engine.run_info import new_run_id, version_info, writer_lock
from labelmill.pipelines.label import build_pipeline
from labelmill.store.commit import OutputStore, StoreState
from labelmill.store.lock import LockHeld
from labelmill.store.read import DatasetVersion
from labelmill.store.refilter import refilter_shard
from labelmill.store.refresh_plan import LabelInputs, plan_refresh

REFRESH_DIR = "_labelmill/refreshes"


#: plan lines printed in text (every shard is in the JSON summary and the refresh record)
PLAN_LINES = 20


def print_plan(plan, stream) -> None:
    details = plan.details()
    for d in details[:PLAN_LINES]:
        print(f"[labelmill]   {d['shard']}: {d['status']} -> {d['action']}"
              + (f" ({d['reason']})" if d["reason"] else ""), file=stream)
    if len(details) > PLAN_LINES:
        print(f"[labelmill]   ... and {len(details) - PLAN_LINES} more (all of them in --json)", file=stream)


def plan_only(cfg: RunConfig, *, content_hash: bool = False, stream=None) -> dict:
    """``refresh --dry-run``: tonight's plan, shard by shard with its reason; takes no lock, writes nothing."""
    stream = stream or sys.stderr
    listing = list_shard_fingerprints(cfg.input.shards, cfg.input.storage_options, content_hash=content_hash)
    store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)
    state = store.state() if store.read_config() is not None else StoreState()
    committed = state.committed()
    plan = plan_refresh(listing, committed, LabelInputs.from_config(cfg))
    summary = {"command": "refresh", "dry_run": True, "output": cfg.output.path,
               "previous_version": state.latest["version"] if state.latest else None, **plan.summary()}
    print(f"[labelmill] refresh plan (dry run): {len(listing)} listed; "
          + ", ".join(f"{v} {k}" for k, v in summary["shards"].items())
          + f"; {len(plan.to_label)} to label, {len(plan.to_refilter)} to re-filter, {len(plan.to_remove)} to remove",
          file=stream)
    print_plan(plan, stream)
    summary["exit_code"] = EXIT_NOTHING_TO_DO if plan.nothing_to_do else EXIT_PUBLISHED
    return summary


def refresh(cfg: RunConfig, *, content_hash: bool = False, stream=None) -> dict:
    """Run one refresh; returns its summary (``exit_code`` included), also kept in the output.  Every night
    leaves a record under ``_labelmill/refreshes/``: a published version, nothing to do, or a lock another
    writer held."""
    stream = stream or sys.stderr
    listing = list_shard_fingerprints(cfg.input.shards, cfg.input.storage_options, content_hash=content_hash)
    OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression).check_writable()
    try:
        return _refresh(cfg, listing, stream)
    except LockHeld as exc:
        store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)
        if store.fs.exists(store.root):  # the night is on record (its own file: no lock needed)
            _finish(store, {"command": "refresh", "output": cfg.output.path, "run_id": new_run_id(),
                            "started_at": datetime.now(timezone.utc).isoformat(), "lock_held": str(exc)},
                    time.monotonic(), version=None, exit_code=EXIT_LOCK_HELD)
        raise


def _refresh(cfg: RunConfig, listing: dict, stream) -> dict:
    with writer_lock(cfg, "refresh") as lock:  # the input and the output were checked: nothing written before
        started, run_id = time.monotonic(), new_run_id()
        store = OutputStore(cfg.output.path, cfg.output.storage_options, cfg.output.compression)
        if store.read_config() is None:
            store.claim(cfg.model_dump(mode="json"), cfg.label_hash())
        repair = store.repair()
        if any(repair.values()):
            print(f"[labelmill] repaired output after an interrupted writer: {repair}", file=stream)
        state = store.state()  # the latest snapshot and the records after it, not the whole history
        committed = state.committed()
        plan = plan_refresh(listing, committed, LabelInputs.from_config(cfg))
        to_label, to_refilter = plan.to_label, plan.to_refilter
        summary = {"command": "refresh", "output": cfg.output.path, "run_id": run_id,
                   "started_at": datetime.now(timezone.utc).isoformat(),
                   "previous_version": state.latest["version"] if state.latest else None,
                   **plan.summary(), "repair": repair}
        counts = summary["shards"]
        print(f"[labelmill] refresh plan: {len(listing)} listed; " + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f"; {len(to_label)} to label, {len(to_refilter)} to re-filter, {len(plan.to_remove)} to remove",
              file=stream)
        print_plan(plan, stream)
        if plan.nothing_to_do:
            store.claim(cfg.model_dump(mode="json"), cfg.label_hash(), replace=True)
            print("[labelmill] nothing to do: no version published", file=stream)
            return _finish(store, summary, started, version=None, exit_code=EXIT_NOTHING_TO_DO)
        if cfg.allow_random_init and to_label:
            print(RANDOM_BANNER, file=stream)
        info, shard_fields = version_info(cfg, run_id)
        info["refresh"] = {"shards": counts, "actions": summary["actions"]}
        loop = CommitLoop(store, cfg.output.commit_every_shards,
                          fingerprints={s: listing[s].to_dict() for s in to_label + to_refilter}, info=info,
                          shard_fields=shard_fields, single_version=True, remove_shards=plan.to_remove,
                          before_commit=lock.ensure_held, kind="refresh")
        if to_refilter:
            view = DatasetVersion(store, state.latest)
            for shard in to_refilter:
                manifest = refilter_shard(store, view, shard, cfg.filter,
                                          {"config_hash": cfg.label_hash(), "run_id": run_id})
                loop.add(pa.Table.from_pylist([manifest]))
                loop.shard_read(shard, len(manifest["indices"]))
        engine = Engine(cfg.ray, batch_size=cfg.ray.batch_size, progress_interval_s=cfg.progress_interval_s,
                        stream=stream)
        counters = engine.run(build_pipeline(cfg, run_id), to_label, loop)
        store.claim(cfg.model_dump(mode="json"), cfg.label_hash(), replace=True)
        summary["rows"] = counters.as_dict()
        version = counters.versions[-1] if counters.versions else None
        print(f"[labelmill] published version {version}", file=stream)
        return _finish(store, summary, started, version=version, exit_code=EXIT_PUBLISHED)


def _finish(store: OutputStore, summary: dict, started: float, *, version: int | None, exit_code: int) -> dict:
    summary.update(version=version, published=version is not None, seconds=round(time.monotonic() - started, 3),
                   exit_code=exit_code)
    path = posixpath.join(store.root, REFRESH_DIR, f"{summary['run_id']}.json")
    store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with store.fs.open(path, "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    return summary
