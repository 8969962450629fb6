"""kill -9 of the driver mid-run, then the same command again: exactly the rows of a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from deltalake import DeltaTable

from helpers import gt_sample, gt_teacher, run_config
from labelmill.config import load_config
from labelmill.pipelines.label import run
from labelmill.io.shards import write_shard

LABEL_COLS = ["shard", "index", "key", "class_name", "score", "bbox", "area", "segmentation"]


def table(out: str, name: str):
    df = DeltaTable(f"{out}/{name}").to_pandas()
    if name == "labels":
        df["segmentation"] = df["segmentation"].map(lambda s: s["counts"] if s is not None else None)
        df["bbox"] = df["bbox"].map(tuple)
        return df.sort_values(["shard", "index", "class_name", "segmentation"]).reset_index(drop=True)
    return df.sort_values(["shard", "index"]).reset_index(drop=True)


def commits(out: Path) -> int:
    log = out / "samples" / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def session_processes(sid: int) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(p.info["pid"]) == sid:
                out.append(f"{p.info['pid']}:{p.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def descendants(pid: int) -> dict[int, tuple[float, str]]:
    """pid -> (create time, name) of every process below ``pid`` now (the driver's Ray: GCS, raylet, agents,
    workers), so that a process that left the driver's session or was re-parented is still found later."""
    import psutil

    out = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            out[p.pid] = (p.create_time(), f"{p.name()} {' '.join(p.cmdline()[:4])}"[:300])
        except psutil.Error:
            continue
    return out


def still_alive(procs: dict[int, tuple[float, str]]) -> list[str]:
    import psutil

    left = []
    for pid, (created, name) in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid}:{name}")
        except psutil.Error:
            continue
    return left


def test_kill_dash_nine_then_rerun_matches_a_clean_run(tmp_path, ray_session):
    shards = tmp_path / "shards"
    for s in range(8):
        write_shard(str(shards / f"s-{s:03d}.tar"), [gt_sample(f"{s}-{i}", seed=s * 10 + i) for i in range(5)])

    def config(out: Path) -> dict:
        cfg = run_config(str(shards), str(out), teachers=[gt_teacher(delay_s=0.4)])
        cfg["output"]["commit_every_shards"] = 1
        cfg["ray"]["batch_size"] = 2
        return cfg

    clean = tmp_path / "clean"
    run(load_config(config(clean)))

    out = tmp_path / "killed"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(out)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "labelmill", "run", str(cfg_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while commits(out) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        ray_procs = descendants(proc.pid)
        names = " ".join(n for _, n in ray_procs.values()).lower()
        assert "raylet" in names and "gcs_server" in names and "agent" in names, names  # agents are covered
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-run
        proc.wait(timeout=30)
        # the embedded Ray dies with its driver: no raylet, GCS, agent or worker is left behind, whether it
        # stayed in the driver's session or not
        left = session_processes(proc.pid) + still_alive(ray_procs)
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = session_processes(proc.pid) + still_alive(ray_procs)
        assert not left, f"processes outlived the killed driver: {left}"
    finally:
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the driver left behind
        except ProcessLookupError:
            pass

    partial = DeltaTable(str(out / "samples")).to_pandas()
    assert 0 < partial.shard.nunique() < 8, "the kill must land mid-run"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    for name, cols in (("samples", ["shard", "index", "key", "status", "num_labels"]), ("labels", LABEL_COLS)):
        got, want = table(str(out), name)[cols], table(str(clean), name)[cols]
        assert len(got) == len(want), name
        assert got.equals(want), name
    # the same rows through a plain Parquet reader: nothing half-written is visible
    import pandas as pd

    assert len(pd.read_parquet(out / "labels")) == len(table(str(clean), "labels"))
    assert len(pd.read_parquet(out / "samples")) == 40
