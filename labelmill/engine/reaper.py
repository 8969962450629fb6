"""Ends what an embedded Ray leaves behind when its driver dies without shutting it down (``kill -9``).

Ray's own fate-sharing takes the GCS and the raylet down with the driver,
but the raylet's agents (``DashboardAgent``, ``RuntimeEnvAgent``) were seen
to outlive it.  :func:`start` launches this file as a small watcher process
(outside the driver's session, importing nothing of labelmill): while the
driver lives it notes every process below it; once the driver is gone it
kills those still running.  ``psutil`` compares creation times, so a reused
pid is never killed.  After a clean ``ray.shutdown()`` nothing is left to kill.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def start(driver_pid: int | None = None) -> subprocess.Popen:
    """Watch ``driver_pid`` (default: this process) from a detached watcher process."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(driver_pid or os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def watch(driver_pid: int, interval: float = 0.5) -> int:
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    me = os.getpid()
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me:  # the watcher is itself a child of the driver
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        except psutil.Error:
            pass
        time.sleep(interval)
    killed = 0
    for proc in known.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
