"""The progress line and the long-step helper; the run's terminal output has an ETA and no Ray warnings."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import make_shards, run_config
from labelmill.engine.commit_loop import RunCounters
from labelmill.engine.progress import Progress, StageTotals, StatusLine, fmt_duration, step


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_status_line_refreshes_in_place_on_a_terminal_and_prints_lines_otherwise():
    tty, log = FakeTTY(), io.StringIO()
    for stream in (tty, log):
        line = StatusLine(stream)
        line.show("a")
        line.show("b")
        line.done("c")
    assert tty.getvalue() == "\r\x1b[2Ka\r\x1b[2Kb\r\x1b[2Kc\n"
    assert log.getvalue() == "a\nb\nc\n"


def test_run_line_has_rates_per_stage_shards_eta_counts_and_gpu():
    out = io.StringIO()
    stages = StageTotals(["read", "decode", "label", "write"])
    p = Progress(0.0, 4, out, stages=stages, gpu=lambda: 87.0)
    c, done = RunCounters(samples=10, labelled=7, no_labels=2, error=1), RunCounters(shards_committed=1)
    p.line(RunCounters(), done)  # the first look: no rate yet
    p.shard_read(10)
    p.shard_read(10)
    stages.update({"read": (20, 1.0), "decode": (20, 2.0), "label": (10, 5.0), "write": (10, 0.1)})
    text = p.line(c, done)
    assert re.search(r"read [\d.]+/s decode [\d.]+/s label [\d.]+/s write [\d.]+/s", text)
    assert "shards 1/4 done, 3 pending, ETA " in text and "ETA ?" not in text
    assert "labelled 7 no_labels 2 error 1" in text and "GPU 87%" in text
    # 4 shards of about 10 samples, 10 done: the ETA is the other 30 at the measured rate
    assert abs(p.eta(10, 1) - 30 / p._rate) < 1e-6
    assert p.eta(40, 4) == 0.0
    assert "GPU" not in Progress(0.0, 1, out, gpu=lambda: None).line(c, done)


def test_step_reports_count_rate_and_time():
    out = io.StringIO()
    with step("export coco", total=3, unit="images", stream=out, interval=0.0) as p:
        for _ in range(3):
            p.advance()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[labelmill] export coco:") and "/3 images" in lines[1]
    assert re.match(r"\[labelmill\] export coco: done, 3/3 images in \d+s$", lines[-1])
    with pytest.raises(KeyError):
        with step("vacuum", stream=out, interval=0.0):
            raise KeyError("x")
    assert out.getvalue().splitlines()[-1].endswith("-- failed")
    # a step that fails at once (bad input) leaves the terminal to the error's own line
    before = out.getvalue()
    with pytest.raises(KeyError):
        with step("vacuum", stream=out, interval=60.0):
            raise KeyError("x")
    assert out.getvalue() == before
    assert fmt_duration(3725) == "1h02m" and fmt_duration(None) == "?"


# Ray's C++ log lines, its deprecation and actor-argument warnings, raylet output, Python warnings raised in ray
RAY_NOISE = re.compile(r"\w+\.cc:\d+|Deprecat|constructor arguments|\(raylet\)|site-packages/ray/|"
                       r"Ray Data|ray\.data|RAY_DEDUP", re.I)


@pytest.mark.slow
def test_a_run_shows_the_eta_line_and_no_ray_warnings(tmp_path):
    make_shards(tmp_path / "shards", 2, 3)
    cfg = run_config(str(tmp_path / "shards"), str(tmp_path / "out"), progress_interval_s=0.5)
    cfg["ray"]["num_cpus"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", LABELMILL_VERBOSE="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "labelmill", "run", str(path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert re.search(r"shards 2/2 done, 0 pending, ETA 0s", err), err[-3000:]
    assert re.search(r"read [\d.]+/s prepare [\d.]+/s infer [\d.]+/s finish [\d.]+/s write [\d.]+/s", err)
    noise = [line for line in err.splitlines() if RAY_NOISE.search(line)]
    assert not noise, noise


def test_into_a_log_the_status_line_comes_every_30_s_and_stderr_is_plain_text():
    import io

    from labelmill.engine.runtime import filtered

    assert Progress(None, 1, io.StringIO()).interval == 30.0  # not a terminal
    assert Progress(5.0, 1, io.StringIO()).interval == 5.0    # asked for
    lines = [b"\x1b[36m(MapWorker(MapBatches(InferActor)) pid=15425)\x1b[0m WARNING:root:No pretrained weights",
             b"[2026-12-07 09:40:37,077 E 15056 15056] core_worker.cc:2465: Actor failed to start",
             b"[2026-12-07 09:40:37,077 W 15056 15056] core_worker.cc:99: a warning",
             b"\x1b[33m(raylet)\x1b[0m [2026-12-07 09:40:37,077 E 1 1] node_manager.cc:1: disk full",
             b"[labelmill] plan: 1 infer actor(s)"]
    plain = filtered(lines, tty=False).decode()
    assert plain == ("(MapWorker(MapBatches(InferActor)) pid=15425) WARNING:root:No pretrained weights\n"
                     "[labelmill] plan: 1 infer actor(s)\n")
    on_terminal = filtered(lines, tty=True)
    assert b"\x1b[36m" in on_terminal and b"Actor failed to start" in on_terminal and b"disk full" in on_terminal
    assert b"a warning" not in on_terminal


def test_a_last_line_before_os_exit_reaches_stderr_past_the_filter():
    """The stall watch's last resort prints one line and calls os._exit, which does not wait for the stderr
    filter's thread: the line goes to the real stderr directly."""
    code = ("import os, sys\n"
            "from labelmill.engine.runtime import filter_native_stderr, write_stderr_now\n"
            "filter_native_stderr()\n"
            "write_stderr_now('labelmill: pipeline stalled (test)\\n')\n"
            "os._exit(1)\n")
    env = dict(os.environ, LABELMILL_QUIET_STDERR="1")
    env.pop("LABELMILL_VERBOSE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == "labelmill: pipeline stalled (test)"
