"""Progress a person can trust: the run's status line and a helper for long steps.

On a terminal the line is refreshed in place (carriage return, clear line);
when stderr is a file or a pipe, plain lines are printed every interval, so
logs stay readable.

* :class:`Progress`: the streaming run's line: samples/s overall and per
  stage (over the last interval), shards done and pending with an ETA,
  counts by status, and GPU utilisation where the driver sees a GPU.
* :func:`step`: the same kind of line for a long step outside the stream
  (model load, export, vacuum, a training epoch)::

      with step("export coco", total=n, unit="images") as p:
          for ...:
              p.advance()

* :class:`StageMeter`: what a stage's worker counts (rows, busy seconds);
  the engine sends the counts to a small actor the driver polls.

Nothing here imports Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

LINE_PREFIX = "[labelmill]"


#: whether the real stderr is a terminal, set when fd 2 is routed through a filter (labelmill.engine.runtime)
STDERR_TTY: bool | None = None


def is_tty(stream) -> bool:
    try:
        if STDERR_TTY is not None and stream.fileno() == 2:
            return STDERR_TTY and os.environ.get("TERM") != "dumb"
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class StatusLine:
    """Writes a status line: in place on a terminal, as plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = is_tty(self.stream)
        self.open = False

    def show(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((160, 24)).columns
            self.stream.write("\r\x1b[2K" + text[: max(width - 1, 20)])
            self.open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str | None = None) -> None:
        """Leave the last state on screen and end the line."""
        if text is not None:
            if self.tty:
                self.stream.write("\r\x1b[2K" + text + "\n")
            else:
                self.stream.write(text + "\n")
        elif self.open:
            self.stream.write("\n")
        self.open = False
        self.stream.flush()


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ------------------------------------------------------------------ GPU
_NVML = None


def gpu_utilisation() -> float | None:
    """Mean utilisation (%) of the GPUs this process sees; None where there is none (or no way to ask)."""
    global _NVML
    try:
        if _NVML is None:
            import pynvml

            pynvml.nvmlInit()
            _NVML = pynvml
        n = _NVML.nvmlDeviceGetCount()
        if n:
            vals = [_NVML.nvmlDeviceGetUtilizationRates(_NVML.nvmlDeviceGetHandleByIndex(i)).gpu for i in range(n)]
            return sum(vals) / len(vals)
        return None
    except Exception:  # noqa: BLE001 - no pynvml or no driver: try nvidia-smi
        _NVML = False if _NVML is None else _NVML
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        vals = [float(v) for v in out.split() if v.strip()]
        return sum(vals) / len(vals) if vals else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ------------------------------------------------------------------ stage meters
class StageMeter:
    """Counts one worker's rows and busy seconds per stage; ``send(deltas)`` ships them (fire and forget)."""

    def __init__(self, send: Callable[[dict[str, tuple[int, float]]], None] | None = None, every_s: float = 0.0):
        self.send = send
        self.every_s = every_s
        self.pending: dict[str, list] = {}
        self.last = time.monotonic()
        self._lock = threading.Lock()  # an actor may run several calls at once (the infer stage does)

    def add(self, stage: str, rows: int, seconds: float) -> None:
        with self._lock:
            entry = self.pending.setdefault(stage, [0, 0.0])
            entry[0] += int(rows)
            entry[1] += float(seconds)
            due = time.monotonic() - self.last >= self.every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self.pending, self.last = self.pending, {}, time.monotonic()
        if pending and self.send is not None:
            self.send({k: (v[0], v[1]) for k, v in pending.items()})


class StageTotals:
    """Driver side: cumulative rows per stage, and the rate over the last interval."""

    def __init__(self, stages: list[str]):
        self.stages = list(stages)
        self.rows: dict[str, int] = {s: 0 for s in self.stages}
        self.busy: dict[str, float] = {s: 0.0 for s in self.stages}
        self._prev: tuple[float, dict[str, int]] = (time.monotonic(), dict(self.rows))
        self.rates: dict[str, float] = {s: 0.0 for s in self.stages}

    def update(self, totals: dict[str, tuple[int, float]]) -> None:
        for stage, (rows, busy) in totals.items():
            self.rows[stage] = int(rows)  # stages not shown are counted, not displayed
            self.busy[stage] = float(busy)

    def overall(self, elapsed: float) -> None:
        """Rates over the whole run (the last line's)."""
        for s in self.stages:
            self.rates[s] = self.rows.get(s, 0) / max(elapsed, 1e-9)
        self._prev = (time.monotonic() + 1e9, dict(self.rows))  # keep them: no further tick

    def tick(self) -> None:
        now = time.monotonic()
        then, prev = self._prev
        dt = now - then
        if dt > 0 and then <= now:
            for s in self.stages:
                self.rates[s] = (self.rows.get(s, 0) - prev.get(s, 0)) / dt
        self._prev = (now, dict(self.rows))


# ------------------------------------------------------------------ the run's line
class Progress:
    """The streaming run's status line (see the module docstring), every ``interval`` seconds."""

    def __init__(self, interval: float | None, total_shards: int, stream=None, *, stages: StageTotals | None = None,
                 gpu: Callable[[], float | None] | None = gpu_utilisation):
        self.total_shards = total_shards
        self.out = StatusLine(stream)
        # None: refreshed in place every 2 s on a terminal; a line every 30 s into a log file or pipe
        self.interval = interval if interval is not None else (2.0 if self.out.tty else 30.0)
        self.stream = self.out.stream
        self.start = time.monotonic()
        self.last = 0.0
        self.last_counts: tuple | None = None
        self.stages = stages
        self.gpu = gpu
        self.shard_rows: list[int] = []  # samples in each shard read so far (for the ETA)
        self._rate = None
        self._prev = (self.start, 0)

    def shard_read(self, rows: int) -> None:
        self.shard_rows.append(int(rows))

    def eta(self, samples: int, committed_shards: int) -> float | None:
        """Seconds left: samples still to label (shard sizes estimated from the shards read) / recent rate."""
        if self.total_shards and committed_shards >= self.total_shards:
            return 0.0
        if not self.shard_rows or not self._rate:
            return None
        expected = sum(self.shard_rows) / len(self.shard_rows) * self.total_shards
        return max(expected - samples, 0) / self._rate

    def line(self, counters, committed) -> str:
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        then, before = self._prev
        if now - then > 0 and counters.samples > before:
            recent = (counters.samples - before) / (now - then)
            self._rate = recent if self._rate is None else 0.5 * self._rate + 0.5 * recent
        self._prev = (now, counters.samples)
        done = committed.shards_committed
        parts = [f"{LINE_PREFIX} {counters.samples:,} samples {counters.samples / elapsed:.1f}/s"]
        if self.stages is not None:
            self.stages.tick()
            parts.append(" ".join(f"{s} {self.stages.rates.get(s, 0.0):.1f}/s" for s in self.stages.stages))
        parts.append(f"shards {done}/{self.total_shards} done, {self.total_shards - done} pending, "
                     f"ETA {fmt_duration(self.eta(counters.samples, done))}")
        parts.append(f"labelled {counters.labelled:,} no_labels {counters.no_labels:,} error {counters.error:,}")
        util = self.gpu() if self.gpu is not None else None
        if util is not None:
            parts.append(f"GPU {util:.0f}%")
        parts.append(fmt_duration(elapsed))
        return " | ".join(parts)

    def update(self, counters, committed, force: bool = False) -> None:
        now = time.monotonic()
        counts = (counters.samples, committed.shards_committed)
        if (force and counts != self.last_counts) or now - self.last >= self.interval:
            self.last, self.last_counts = now, counts
            self.out.show(self.line(counters, committed))

    def close(self, counters, committed) -> None:
        """The last line: per-stage rates over the whole run."""
        if self.stages is not None:
            self.stages.overall(time.monotonic() - self.start)
        self.out.done(self.line(counters, committed))


# ------------------------------------------------------------------ long steps
class StepProgress:
    """Progress of one long step; see :func:`step`."""

    def __init__(self, name: str, total: float | None, unit: str, stream, interval: float):
        self.name, self.total, self.unit, self.interval = name, total, unit, interval
        self.out = StatusLine(stream)
        self.done_n = 0.0
        self.start = time.monotonic()
        self.last = 0.0
        self.note = ""

    def advance(self, n: float = 1, note: str | None = None) -> None:
        self.done_n += n
        if note is not None:
            self.note = note
        if time.monotonic() - self.last >= self.interval:
            self.show()

    def show(self) -> None:
        self.last = time.monotonic()
        self.out.show(self.text())

    def text(self, finished: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done_n / elapsed if elapsed > 0 else 0.0
        count = f"{self.done_n:,.0f}" + (f"/{self.total:,.0f}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        text = f"{LINE_PREFIX} {self.name}: "
        if finished:
            text += f"done, {count} in {fmt_duration(elapsed)}" if self.done_n or self.total else f"done in {fmt_duration(elapsed)}"
        else:
            text += count if (self.done_n or self.total) else "..."
            if self.done_n:
                text += f", {rate:.1f}/s"
            if self.total and rate > 0:
                text += f", ETA {fmt_duration((self.total - self.done_n) / rate)}"
            text += f" | {fmt_duration(elapsed)}"
        return text + (f" ({self.note})" if self.note else "")


@contextmanager
def step(name: str, total: float | None = None, unit: str = "", stream=None,
         interval: float = 1.0) -> Iterator[StepProgress]:
    """Show a long step's progress (refreshed in place on a terminal) and how long it took."""
    p = StepProgress(name, total, unit, stream or sys.stderr, interval)
    started = time.monotonic()
    try:
        yield p
    except BaseException:
        # a step that fails at once (bad input) leaves the terminal to the error's one line
        if time.monotonic() - started >= interval:
            p.out.done(p.text() + " -- failed")
        raise
    p.out.done(p.text(finished=True))
