"""The embedded Ray's watcher: after a kill -9 of the driver, nothing it started keeps running (item 18)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from labelmill.engine import reaper

DRIVER = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import reaper
watcher = reaper.start()  # as start_ray does: the watcher is a child of the driver it watches
# like the raylet's agents: a grandchild in its own session, which the driver's death does not end
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
    "start_new_session=True); time.sleep(600)"])
print(watcher.pid, flush=True)
time.sleep(600)
"""


def test_processes_below_a_killed_driver_are_ended(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, os.path.dirname(reaper.__file__)],
                              stdout=subprocess.PIPE, text=True)
    watcher = None
    try:
        watcher = psutil.Process(int(driver.stdout.readline()))
        deadline = time.monotonic() + 60
        while len(psutil.Process(driver.pid).children(recursive=True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        below = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.pid != watcher.pid]
        assert len(below) == 2
        time.sleep(2)  # the watcher notes what runs below the driver
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        gone, alive = psutil.wait_procs(below, timeout=60)
        assert not alive, alive
        watcher.wait(timeout=30)  # and then ends
    finally:
        for p in psutil.Process().children(recursive=True):
            if p.pid in {driver.pid} or (watcher is not None and p.pid == watcher.pid):
                p.kill()


def test_the_watcher_runs_before_ray_starts(monkeypatch):
    """A kill -9 during Ray's own start-up is covered too: the watcher exists when ray.init is called."""
    import pytest
    import ray

    from labelmill.config import RayConfig
    from labelmill.engine import runtime

    seen = {}

    def init(**kwargs):
        seen["watcher"] = runtime._REAPER
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "_REAPER", None)
    with pytest.raises(runtime.RayStartError, match="stop here"):
        runtime.start_ray(RayConfig())
    watcher = seen["watcher"]
    assert watcher is not None and watcher.poll() is None  # alive while Ray starts
    watcher.kill()
    watcher.wait(timeout=10)
