"""Student training: a pinned dataset version -> Ray Data -> Ray Train -> a student checkpoint.

``train(cfg)`` composes the pieces of :mod:`labelmill.training`: the task's
``prepare`` (pin the version, check labels and vocabulary, build the
streamed dataset), the shared Ray Train ``fit``, and what the user sees of
it (:mod:`labelmill.training.watch`: ``run.json``, the status line, one
line on Ctrl-C saying where the run resumes).
"""

from __future__ import annotations

import sys

from labelmill.config import RayConfig
from labelmill.engine.runtime import start_ray
from labelmill.training.data import quiet_ray_data
from labelmill.training.loop import check_cluster_fits, fit, run_dir, saved_checkpoints


def train(cfg, status: bool = False) -> dict:
    """Train ``cfg``'s student; ``status``: show the status line on stderr (the CLI does)."""
    from labelmill.engine.progress import LINE_PREFIX
    from labelmill.training.watch import RunRecord, Watch

    if cfg.task == "maskclip-plus":
        from labelmill.training.maskclip_plus import prepare
    else:
        from labelmill.training.glip import prepare
    # the CLI's status line stands for Ray Train's own output, which stays in Ray's logs (unless --verbose)
    started_here, remote = start_ray(RayConfig(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus),
                                     log_to_driver=not status)
    if started_here and not remote:  # a fixed local cluster: its size is known (an autoscaler may grow others)
        check_cluster_fits(cfg)
    quiet_ray_data()
    datasets, extra = prepare(cfg)
    saved = saved_checkpoints(cfg.checkpoint)
    resume_from = saved[0][0] if saved else None
    where = run_dir(cfg.checkpoint)[1]
    if status:
        if resume_from is not None:
            print(f"{LINE_PREFIX} resuming from step {resume_from:,} ({saved[0][1]})", file=sys.stderr)
        print(f"{LINE_PREFIX} run folder {where}: checkpoints, metrics/, run.json", file=sys.stderr)
    record = RunRecord(cfg, extra.get("provenance", {}), resume_from)
    watch = Watch(cfg) if status else None
    try:
        if watch is not None:
            with watch:
                result = fit(cfg, datasets, extra, attempt=watch.attempt, private=started_here and not remote)
        else:
            result = fit(cfg, datasets, extra, private=started_here and not remote)
    except KeyboardInterrupt:
        done = saved_checkpoints(cfg.checkpoint)
        step = (watch.last or {}).get("step") if watch is not None else None
        record.end("interrupted", step=step, checkpoint=done[0][1] if done else None)
        at = f" at step {step:,}" if step else ""
        resume = (f"the last checkpoint is step {done[0][0]:,}: run the same command again to resume from it"
                  if done else "no checkpoint was written yet: running the same command again starts over")
        raise KeyboardInterrupt(f"training stopped{at}; {resume}") from None
    except BaseException as exc:
        record.end("failed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        raise
    result["dataset"] = extra.get("provenance", {})
    record.end("finished", step=result.get("step"), checkpoint=result.get("checkpoint"))
    return result
