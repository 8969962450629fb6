"""What a user sees of a training run: ``run.json``, ``progress.json`` and the status line.

The run folder (``checkpoint.path/checkpoint.name``) holds everything a run
leaves: checkpoints, the ``metrics/`` table, ``run.json`` (what was started,
from which version, how it ended) and ``progress.json`` (the latest step,
written by rank 0 at each report).  The driver polls ``progress.json`` and
prints the same kind of status line as ``labelmill run``: step/max, loss,
samples/s, ETA and the last checkpoint, in place on a terminal and every
30 s into a log.
"""

from __future__ import annotations

import json
import posixpath
import threading
import time
from datetime import datetime, timezone

RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(checkpoint, name: str, data: dict) -> None:
    from labelmill.training.loop import run_dir

    fs, root = run_dir(checkpoint)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, name)
    if "://" in checkpoint.path:
        fs.pipe_file(path, json.dumps(data, default=str).encode())  # one PUT: atomic on object stores
        return
    tmp = posixpath.join(root, f".{name}.tmp")
    with fs.open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    fs.mv(tmp, path)


def read_json(checkpoint, name: str) -> dict | None:
    from labelmill.training.loop import run_dir

    fs, root = run_dir(checkpoint)
    try:
        with fs.open(posixpath.join(root, name), "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def write_progress(checkpoint, progress: dict) -> None:
    _write_json(checkpoint, PROGRESS_FILE, {**progress, "time": time.time()})


class RunRecord:
    """``run.json``: written when the run starts, updated when it ends (finished, failed, interrupted)."""

    def __init__(self, cfg, provenance: dict, resume_from: int | None):
        self.checkpoint = cfg.checkpoint
        self.data = {"task": cfg.task, "name": cfg.checkpoint.name, "status": "running", "started_at": _now(),
                     "max_steps": cfg.optim.max_steps, "resumed_from_step": resume_from,
                     "dataset": provenance, "config": cfg.model_dump(mode="json")}
        runs = (read_json(self.checkpoint, RUN_FILE) or {}).get("attempts", [])
        self.data["attempts"] = runs + [{"started_at": self.data["started_at"], "from_step": resume_from or 0,
                                         "status": "running"}]  # stays so if the driver is killed
        _write_json(self.checkpoint, RUN_FILE, self.data)

    def end(self, status: str, **info) -> None:
        self.data.update(status=status, ended_at=_now(), **info)
        self.data["attempts"][-1].update(status=status, ended_at=self.data["ended_at"],
                                         step=info.get("step"))
        _write_json(self.checkpoint, RUN_FILE, self.data)


def status_text(task: str, progress: dict | None, max_steps: int, elapsed: float) -> str:
    from labelmill.engine.progress import LINE_PREFIX, fmt_duration

    head = f"{LINE_PREFIX} train {task}: "
    if not progress:
        return head + f"starting Ray Train (data and workers) | {fmt_duration(elapsed)}"
    step = int(progress.get("step", 0))
    text = head + f"step {step:,}/{max_steps:,}"
    if progress.get("loss") is not None:
        text += f", loss {float(progress['loss']):.4g}"
    rate = progress.get("samples_per_s")
    if rate:
        text += f", {float(rate):.1f} samples/s"
    steps_per_s = progress.get("steps_per_s")
    if steps_per_s:
        text += f", ETA {fmt_duration((max_steps - step) / float(steps_per_s))}"
    ckpt = progress.get("checkpoint_step")
    text += f", checkpoint at step {ckpt:,}" if ckpt else ", no checkpoint yet"
    return text + f" | {fmt_duration(elapsed)}"


class Watch:
    """A driver thread that turns ``progress.json`` into the status line."""

    def __init__(self, cfg, interval: float | None = None):
        from labelmill.engine.progress import StatusLine

        self.cfg = cfg
        self.attempt = time.time()  # rank 0 writes it into progress.json: an earlier attempt's file is not ours
        self.out = StatusLine()
        self.interval = interval if interval is not None else (2.0 if self.out.tty else 30.0)
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.last: dict | None = None
        self.thread = threading.Thread(target=self._run, name="labelmill-train-status", daemon=True)

    def __enter__(self) -> "Watch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        self.poll()
        self.out.done(self.text())

    def poll(self) -> dict | None:
        got = read_json(self.cfg.checkpoint, PROGRESS_FILE)
        if got and got.get("attempt") == self.attempt:
            self.last = got
        return self.last

    def text(self) -> str:
        return status_text(self.cfg.task, self.last, self.cfg.optim.max_steps, time.monotonic() - self.started)

    def _run(self) -> None:
        first = True
        while not self.stop_event.wait(0.5 if first else self.interval):
            first = False
            self.poll()
            self.out.show(self.text())
