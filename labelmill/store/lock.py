"""One writer per output: a lock that works on a local disk and on S3.

The lock is a sequence of small JSON records under
``OUTPUT/_labelmill/lock/``, one per holder: ``000000000007.json``. The
highest number is the lock's current state. Taking the lock means creating
the next number **if it does not exist yet**, and that is the only atomic
step needed:

* local disk: the record is written to a temporary file and hard-linked to
  its name (``link`` fails if the name exists; a reader never sees a half
  written record); where hard links are not supported, ``O_CREAT|O_EXCL``;
* S3: ``PutObject`` with ``If-None-Match: *`` (S3 conditional writes; moto
  implements them too), which fails with 412 if the key exists.

Two writers that race for the same number: exactly one creation succeeds,
the other reads the winner's record and raises :class:`LockHeld`.

While it holds the lock, a holder rewrites its own record every
``heartbeat_s`` seconds. A record is **dead** when it says ``released``, or
when its last heartbeat is older than ``ttl_s``, or (same host only) when
its process no longer exists (pid and process start time). A dead record
is simply superseded by the next number, with a log line naming the old
holder; nothing is ever deleted or overwritten by a contender, so a slow
holder cannot lose track of who won. A holder that finds a higher number
than its own has lost the lock: :meth:`OutputLock.ensure_held` raises
:class:`LockLost`, so a writer checks it right before it publishes.

Records older than the previous one are pruned by each new holder.
Heartbeat times are wall-clock seconds: hosts sharing an output need
clocks that agree to well within the TTL (NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any, Callable

import fsspec

log = logging.getLogger("labelmill.lock")

LOCK_DIR = "_labelmill/lock"
DEFAULT_TTL_S = 600.0


class LockError(RuntimeError):
    """Base class of lock failures."""


class LockHeld(LockError):
    """Another live writer holds the output's lock (the CLI maps this to its own exit code)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


class LockLost(LockError):
    """This writer's lock was taken over (its heartbeat stopped for longer than the TTL)."""


def _process_started(pid: int) -> float | None:
    """Start time of a local process, or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists, but we may not inspect it: count it as alive
        return -1.0


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """``refresh (pid 12 on host-a, since 2026-01-01T00:00:00Z, last heartbeat 3 s ago)``."""
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("acquired_at", 0)))
    age = now - float(record.get("heartbeat_at", 0))
    return (f"{record.get('command') or 'a writer'} (pid {record.get('pid')} on {record.get('host')}, "
            f"owner {record.get('owner')}, since {since}, last heartbeat {age:.0f} s ago)")


class OutputLock:
    """The writer lock of one output folder (local path or ``s3://``).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.
    ``clock`` is for tests (a fake wall clock); ``heartbeat_s`` defaults to
    a tenth of the TTL, and ``heartbeat_s=0`` disables the background
    thread (call :meth:`heartbeat` yourself).
    """

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        *,
        command: str = "",
        ttl_s: float = DEFAULT_TTL_S,
        heartbeat_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.output = output.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.output, **(storage_options or {}))
        self.root = root
        self.dir = posixpath.join(root, LOCK_DIR)
        self.local = "file" in _protocols(self.fs)
        self._fresh_output = False  # the output did not exist when the lock was taken
        self.command = command
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = self.ttl_s / 10 if heartbeat_s is None else float(heartbeat_s)
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self.record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ storage
    def _path(self, generation: int) -> str:
        return posixpath.join(self.dir, f"{generation:012d}.json")

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = posixpath.basename(name.rstrip("/"))
            if base.endswith(".json") and base[:-5].isdigit():
                out.append(int(base[:-5]))
        return sorted(out)

    def _read(self, generation: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self._path(generation)))
        except FileNotFoundError:
            return None
        except ValueError:  # O_EXCL fallback: a record being written; treat it as fresh
            return {"owner": "?", "heartbeat_at": self.clock(), "note": "record being written"}

    def _create(self, generation: int, body: bytes) -> bool:
        """Create the record if no record of that number exists; False if one does."""
        path = self._path(generation)
        if self.local:
            os.makedirs(self.dir, exist_ok=True)
            tmp = posixpath.join(self.dir, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: exclusive create
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                return True
            finally:
                os.unlink(tmp)
        try:  # s3fs: PutObject with If-None-Match: *
            self.fs.pipe_file(path, body, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs maps 412 Precondition Failed to an OSError too
            if "Precondition" in str(exc) or "412" in str(exc):
                return False
            raise

    def _overwrite(self, generation: int, body: bytes) -> None:
        path = self._path(generation)
        if self.local:
            tmp = posixpath.join(self.dir, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)

    # ------------------------------------------------------------ liveness
    def dead_reason(self, record: dict[str, Any]) -> str | None:
        """Why a record no longer holds the lock, or None if its holder is alive."""
        if record.get("released"):
            return "released"
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            started = _process_started(record["pid"])
            if started is None:
                return "its process is gone"
            if started > 0 and record.get("pid_started") is not None and abs(started - record["pid_started"]) > 1:
                return "its process is gone (pid reused)"
        age = self.clock() - float(record.get("heartbeat_at", 0))
        ttl = float(record.get("ttl_s", self.ttl_s))
        if age > ttl:
            return f"no heartbeat for {age:.0f} s (TTL {ttl:.0f} s)"
        return None

    # ------------------------------------------------------------ acquire
    def _body(self, **extra: Any) -> bytes:
        now = self.clock()
        record = dict(self.record or {}, heartbeat_at=now, **extra)
        self.record = record
        return json.dumps(record, sort_keys=True).encode()

    def acquire(self) -> "OutputLock":
        """Take the lock now or raise :class:`LockHeld` (never waits)."""
        if self.generation is not None:
            raise LockError("this lock object already holds the lock")
        try:
            self._fresh_output = not self.fs.exists(self.root)
        except Exception:  # noqa: BLE001 - unknown: keep whatever is there
            self._fresh_output = False
        for _ in range(20):  # only loops when records vanish under us (pruning)
            generations = self._generations()
            previous = None
            if generations:
                top = generations[-1]
                previous = self._read(top)
                if previous is None:
                    continue
                reason = self.dead_reason(previous)
                if reason is None:
                    raise self._held(previous)
                nxt = top + 1
            else:
                reason, nxt = None, 0
            now = self.clock()
            self.record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": _process_started(os.getpid()), "command": self.command,
                           "acquired_at": now, "ttl_s": self.ttl_s, "generation": nxt, "released": False}
            if not self._create(nxt, self._body()):
                winner = self._read(nxt)
                self.record = None
                raise self._held(winner or {"owner": "?"})
            self.generation = nxt
            if previous is not None and reason != "released":
                self.took_over = previous
                log.warning("lock of %s taken over from %s: %s", self.output, describe(previous, now), reason)
            self._prune(nxt)
            if self.heartbeat_s > 0:
                self._thread = threading.Thread(target=self._beat, name="labelmill-lock-heartbeat", daemon=True)
                self._thread.start()
            return self
        raise LockError(f"lock records of {self.output} keep changing; try again")

    def _held(self, record: dict[str, Any]) -> LockHeld:
        return LockHeld(
            f"output {self.output} is locked by {describe(record, self.clock())}: another writer is running. "
            f"Run again when it has finished; a dead writer's lock is taken over after its TTL "
            f"({float(record.get('ttl_s', self.ttl_s)):.0f} s).",
            record,
        )

    def _prune(self, generation: int) -> None:
        for old in self._generations():
            if old < generation - 1:
                try:
                    self.fs.rm_file(self._path(old))
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------ holding
    def heartbeat(self) -> None:
        """Refresh this holder's record; notices (and records) a takeover."""
        if self.generation is None or self._lost:
            return
        if self._superseded():
            self._lost = True
            log.error("lock of %s was taken over by another writer; this writer must not publish", self.output)
            return
        self._overwrite(self.generation, self._body())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # storage hiccup: try again next beat
                log.warning("lock heartbeat of %s failed: %s: %s", self.output, type(exc).__name__, exc)

    def _superseded(self) -> bool:
        generations = self._generations()
        return bool(generations) and generations[-1] > (self.generation or 0)

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless this writer still holds the lock (call before publishing)."""
        if self.generation is None:
            raise LockLost(f"the lock of {self.output} is not held")
        if self._lost or self._superseded():
            self._lost = True
            raise LockLost(f"the lock of {self.output} was taken over by another writer (this writer stalled "
                           f"for longer than the TTL of {self.ttl_s:.0f} s); nothing was published")

    def release(self) -> None:
        """Give the lock up (a no-op if it was lost or never taken)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.generation is not None and not self._lost and not self._superseded():
            try:
                self._overwrite(self.generation, self._body(released=True, released_at=self.clock()))
            except OSError:  # e.g. no space left: drop our record instead (that needs no space), never raise
                try:
                    self.fs.rm(self._path(self.generation))
                except OSError:
                    log.warning("could not release the lock of %s; the next writer takes it over after its TTL",
                                self.output)
        self.generation = None

    def remove_if_only_lock(self) -> None:
        """A writer that failed before writing anything leaves nothing: an output this lock created and that
        holds only lock records is removed again."""
        if not self._fresh_output:
            return
        try:
            names = [posixpath.relpath(p, self.root) for p in self.fs.find(self.root)]
            if all(n.startswith(LOCK_DIR + "/") for n in names):
                self.fs.rm(self.root, recursive=True)
        except Exception:  # noqa: BLE001 - tidying only
            pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_lock(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The current lock record of an output (for status commands), or None if it was never locked."""
    probe = OutputLock(output, storage_options, heartbeat_s=0)
    generations = probe._generations()
    return probe._read(generations[-1]) if generations else None
