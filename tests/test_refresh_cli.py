"""`labelmill refresh` as a scheduler runs it: --help, --json, two at once, and kill -9 at a random moment."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from labelmill import data
from labelmill.config import load_config
from labelmill.exitcodes import EXIT_LOCK_HELD, EXIT_NOTHING_TO_DO, EXIT_PUBLISHED, exit_code_from_log
from labelmill.pipelines.label import run
from test_refresh import config, rows, write

ENV = dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "labelmill", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["refresh", "versions", "diff", "rollback", "vacuum"])
def test_help(command):
    res = cli(command, "--help")
    assert res.returncode == 0 and f"usage: labelmill {command}" in res.stdout


def test_json_summary_on_error_carries_the_exit_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "no-shards", tmp_path / "out")))
    res = cli("refresh", str(path), "--json")
    assert res.returncode == 4 and exit_code_from_log(res.stdout.splitlines()) == 4
    assert "input error" in res.stderr


def start(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "labelmill", "refresh", str(cfg_path), "--json"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def reap(proc: subprocess.Popen) -> None:
    """Ray processes a killed driver may leave in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_two_refreshes_at_once(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    for s in range(3):
        write(shards, s)
    cfg = config(shards, out)
    cfg["teachers"][0]["delay_s"] = 0.5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = [start(path), start(path)]
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            reap(p)
    codes = sorted(p.returncode for p in procs)
    assert codes == [EXIT_PUBLISHED, EXIT_LOCK_HELD], results
    loser = results[[p.returncode for p in procs].index(EXIT_LOCK_HELD)]
    assert "lock held" in loser[1] and json.loads(loser[0].splitlines()[-1])["exit_code"] == EXIT_LOCK_HELD
    assert [v["version"] for v in data.versions(str(out))] == [1]
    assert len(data.open(str(out)).read("samples")) == 9  # not doubled
    # both nights are on record, the one that found the lock held too
    nights = [json.loads(p.read_text()) for p in (out / "_labelmill" / "refreshes").glob("*.json")]
    assert sorted(n["exit_code"] for n in nights) == [EXIT_PUBLISHED, EXIT_LOCK_HELD]
    assert [n for n in nights if n["exit_code"] == EXIT_LOCK_HELD][0]["lock_held"]


@pytest.mark.slow
def test_kill_dash_nine_at_a_random_moment_then_rerun(tmp_path, ray_session):
    seed = random.randrange(1 << 30)
    print(f"kill seed {seed}")
    rng = random.Random(seed)
    shards, out = tmp_path / "shards", tmp_path / "out"
    for s in range(3):
        write(shards, s)
    run(load_config(config(shards, out)))
    first = [v["version"] for v in data.versions(str(out))]
    write(shards, 3)
    write(shards, 1, version=1, n=4)
    (shards / "s-002.tar").unlink()
    cfg = config(shards, out)
    cfg["teachers"][0]["delay_s"] = 0.3
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = start(path)
    try:
        moment = rng.uniform(0.5, 20.0)
        time.sleep(moment)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        time.sleep(1)
        reap(proc)
    print(f"killed after {moment:.1f} s" if killed else f"finished before {moment:.1f} s")
    rerun = subprocess.run([sys.executable, "-m", "labelmill", "refresh", str(path), "--json"], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode in (EXIT_PUBLISHED, EXIT_NOTHING_TO_DO), rerun.stderr[-3000:]
    versions = [v["version"] for v in data.versions(str(out))]
    assert versions == first + [first[-1] + 1], "exactly one new version"
    assert rows(out) == rows(out, versions[-1])
    from test_refresh import scratch

    assert rows(out) == scratch(shards, tmp_path / "scratch")


def test_run_takes_the_writer_lock(tmp_path, capsys):
    from labelmill.cli import main
    from labelmill.store.lock import OutputLock

    shards, out = tmp_path / "shards", tmp_path / "out"
    write(shards, 0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(shards, out)))
    with OutputLock(str(out), command="refresh"):
        assert main(["run", str(path)]) == EXIT_LOCK_HELD
        assert main(["refresh", str(path), "--json"]) == EXIT_LOCK_HELD
    captured = capsys.readouterr()
    assert "locked by refresh" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["exit_code"] == EXIT_LOCK_HELD
    assert data.versions(str(out)) == [] and not (out / "samples").exists()
