"""The output lock: exactly one of racing writers wins, dead holders are taken over, S3 too."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from labelmill.store.lock import LockHeld, LockLost, OutputLock, read_lock
from s3server import s3_endpoint  # noqa: F401  (fixture)

RACER = """
import json, os, sys, time
from labelmill.store.lock import LockHeld, OutputLock
output, go, hold, opts = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lock = OutputLock(output, opts, command="racer", ttl_s=600).acquire()
except LockHeld as exc:
    print("HELD", exc, flush=True)
    sys.exit(0)
print("WON", flush=True)
time.sleep(hold)
lock.release()
"""


def _race(output: str, tmp_path, n: int, opts: dict | None = None, hold: float = 3.0) -> list[str]:
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, output, str(go), str(hold), json.dumps(opts or {})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    time.sleep(1.0)  # let every racer import and wait at the line
    go.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(out.split(" ", 1)[0].strip())
    return results


def test_racing_processes_exactly_one_wins(tmp_path):
    output = str(tmp_path / "out")
    for _ in range(2):
        results = _race(output, tmp_path, 4)
        assert sorted(results) == ["HELD", "HELD", "HELD", "WON"], results
    # the winner released: the next writer gets it at once, as a new generation
    with OutputLock(output, command="next") as lock:
        assert lock.generation == 2 and lock.took_over is None
    assert read_lock(output)["released"] is True


def test_held_lock_refuses_with_a_clear_message(tmp_path):
    output = str(tmp_path / "out")
    with OutputLock(output, command="refresh"):
        with pytest.raises(LockHeld, match=r"locked by refresh \(pid \d+ on .*another writer is running") as info:
            OutputLock(output, command="vacuum").acquire()
        assert info.value.holder["command"] == "refresh" and info.value.holder["pid"] == os.getpid()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    output = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", RACER, output, str(tmp_path), "600", "{}"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("WON")
    with pytest.raises(LockHeld):
        OutputLock(output).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="labelmill.lock"):
        lock = OutputLock(output, command="rerun").acquire()
    try:
        assert lock.took_over["pid"] == holder.pid
        assert f"pid {holder.pid}" in caplog.text and "its process is gone" in caplog.text
    finally:
        lock.release()


def _foreign_record(output: str, generation: int, heartbeat_at: float, ttl_s: float = 60.0) -> None:
    folder = os.path.join(output, "_labelmill", "lock")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{generation:012d}.json"), "w") as fh:
        json.dump({"owner": "node-7:4242:abcd", "host": "node-7", "pid": 4242, "command": "refresh",
                   "acquired_at": heartbeat_at - 5, "heartbeat_at": heartbeat_at, "ttl_s": ttl_s,
                   "released": False}, fh)


def test_other_hosts_lock_taken_over_only_after_its_ttl(tmp_path, caplog):
    output = str(tmp_path / "out")
    now = 1_000_000.0
    _foreign_record(output, 3, heartbeat_at=now - 59)
    with pytest.raises(LockHeld, match="node-7"):
        OutputLock(output, clock=lambda: now, heartbeat_s=0).acquire()
    with caplog.at_level(logging.WARNING, logger="labelmill.lock"):
        lock = OutputLock(output, clock=lambda: now + 2, heartbeat_s=0).acquire()
    assert lock.generation == 4 and lock.took_over["owner"] == "node-7:4242:abcd"
    assert "taken over from refresh (pid 4242 on node-7" in caplog.text and "no heartbeat for 61 s" in caplog.text
    lock.release()


def test_heartbeat_keeps_the_lock_and_a_stalled_holder_learns_it_lost(tmp_path):
    output = str(tmp_path / "out")
    t = [0.0]
    holder = OutputLock(output, ttl_s=10, heartbeat_s=0, clock=lambda: t[0]).acquire()
    # our own pid is alive, so only the heartbeat's age decides
    t[0] = 8.0
    holder.heartbeat()
    t[0] = 15.0
    with pytest.raises(LockHeld):
        OutputLock(output, ttl_s=10, heartbeat_s=0, clock=lambda: t[0]).acquire()
    holder.ensure_held()
    t[0] = 30.0  # the holder stalled for longer than the TTL
    rival = OutputLock(output, ttl_s=10, heartbeat_s=0, clock=lambda: t[0]).acquire()
    assert rival.took_over["owner"] == holder.owner
    with pytest.raises(LockLost, match="taken over"):
        holder.ensure_held()
    holder.heartbeat()  # must not overwrite anything of the rival
    holder.release()
    assert read_lock(output)["owner"] == rival.owner and read_lock(output)["released"] is False
    rival.release()


def test_old_records_are_pruned(tmp_path):
    output = str(tmp_path / "out")
    for _ in range(5):
        with OutputLock(output, heartbeat_s=0):
            pass
    names = sorted(os.listdir(os.path.join(output, "_labelmill", "lock")))
    assert names == ["000000000003.json", "000000000004.json"]


@pytest.mark.slow
def test_s3_conditional_write_lock(s3_endpoint, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="out")
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    # the primitive itself: a second create of the same key is refused by the server
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.pipe_file("out/probe", b"1", mode="create")
    with pytest.raises(FileExistsError):  # 412 Precondition Failed, If-None-Match
        fs.pipe_file("out/probe", b"2", mode="create")
    assert fs.cat_file("out/probe") == b"1"

    output = "s3://out/labels"
    results = _race(output, tmp_path, 3, opts)
    assert sorted(results) == ["HELD", "HELD", "WON"], results
    with OutputLock(output, opts, command="refresh", heartbeat_s=0) as lock:
        with pytest.raises(LockHeld, match="locked by refresh"):
            OutputLock(output, opts).acquire()
        lock.heartbeat()
        lock.ensure_held()
    t = [time.time() + 10_000]  # a holder whose heartbeat is long past its TTL (other host's view)
    stale = OutputLock(output, opts, ttl_s=5, heartbeat_s=0).acquire()
    stale.record["host"] = "elsewhere"
    stale.heartbeat()
    rival = OutputLock(output, opts, ttl_s=5, heartbeat_s=0, clock=lambda: t[0]).acquire()
    assert rival.took_over["owner"] == stale.owner
    with pytest.raises(LockLost):
        stale.ensure_held()
    rival.release()


def test_cli_maps_lock_held_to_its_exit_code(tmp_path, monkeypatch, capsys):
    """Any command that meets a held lock exits 75 with a one-line message (the commands take the lock in round 2)."""
    from labelmill import cli
    from labelmill.exitcodes import EXIT_LOCK_HELD

    output = str(tmp_path / "out")

    def locked_report(args):
        with OutputLock(args.output, command="report-test", heartbeat_s=0):
            pass
        return 0

    with OutputLock(output, command="refresh", heartbeat_s=0):
        monkeypatch.setattr(cli, "_cmd_report", locked_report)
        assert cli.main(["report", output, str(tmp_path / "r.html")]) == EXIT_LOCK_HELD
    err = capsys.readouterr().err.strip()
    assert err.startswith("labelmill: lock held: output") and "locked by refresh" in err and "\n" not in err
