"""Exit codes of the ``labelmill`` command, for schedulers and alerts.

One table, used by the CLI, the deploy manifests (``deploy/``) and the
README. A scheduler treats 0 as success; ``EXIT_NOTHING_TO_DO`` is a
success too, made distinct so that a dashboard can tell "published a
version" from "nothing changed tonight" (the deploy wrappers map it to 0).

``ray job submit`` does not pass a job's exit code on (it exits 1 when the
job failed, else 0), so ``labelmill refresh --json`` ends its stdout with a
one-line JSON summary carrying ``"exit_code"``; :func:`exit_code_from_log`
finds it in the streamed log, and the Kubernetes CronJob in ``deploy/``
exits with it.
"""

from __future__ import annotations

import json
from typing import Iterable

EXIT_PUBLISHED = 0       # a new dataset version was published (or a command succeeded)
EXIT_ERROR = 1           # unexpected error (a traceback): a bug or an infrastructure failure
EXIT_CONFIG = 2          # the config (or a command-line value) is invalid: fix it, retrying will not help
EXIT_WEIGHTS = 3         # teacher weights missing or unusable
EXIT_INPUT = 4           # the input cannot be listed or matches no shard
EXIT_OUTPUT = 5          # the output folder belongs to another config, or is inconsistent
EXIT_FAILED_SHARDS = 6   # finished and published, but some shards failed: the version lacks them
EXIT_NOTHING_TO_DO = 7   # nothing changed since the current version: nothing was published
EXIT_LOCK_HELD = 75      # another writer holds the output's lock (sysexits EX_TEMPFAIL): try later
EXIT_INTERRUPTED = 130   # stopped by Ctrl-C (SIGINT), as shells report it
EXIT_PIPE_CLOSED = 141   # stdout was closed early (``labelmill yield ... | head``), as shells report SIGPIPE

MEANING = {
    EXIT_PUBLISHED: "published (success)",
    EXIT_ERROR: "unexpected error",
    EXIT_CONFIG: "config error",
    EXIT_WEIGHTS: "weights error",
    EXIT_INPUT: "input error",
    EXIT_OUTPUT: "output error",
    EXIT_FAILED_SHARDS: "finished with failed shards",
    EXIT_NOTHING_TO_DO: "nothing to do (success, nothing published)",
    EXIT_LOCK_HELD: "lock held by another writer",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE_CLOSED: "stdout closed by the reader (e.g. | head): output cut short",
}

#: codes a scheduler should count as success
SUCCESS = frozenset({EXIT_PUBLISHED, EXIT_NOTHING_TO_DO})
#: codes where retrying the same command soon cannot help (alert a person)
PERMANENT = frozenset({EXIT_CONFIG, EXIT_WEIGHTS, EXIT_INPUT, EXIT_OUTPUT})


#: known errors, most specific first: class (module:qualname, matched along the MRO, so no import is needed to
#: test), exit code (None: the exception's own ``exit_code``), prefix of the line (None: the class name)
_KNOWN: tuple[tuple[str, int | None, str | None], ...] = (
    ("labelmill.config:ConfigError", EXIT_CONFIG, "config error"),
    ("labelmill.stages.base:ContractError", EXIT_CONFIG, "config error"),
    ("labelmill.models.common:WeightsError", EXIT_WEIGHTS, "weights error"),
    ("labelmill.io.shards:ShardListError", EXIT_INPUT, "input error"),
    ("labelmill.store.read:OutputNotFound", EXIT_INPUT, "input error"),
    ("labelmill.store.read:VersionNotFound", EXIT_INPUT, "input error"),
    ("labelmill.store.commit:OutputConflictError", EXIT_OUTPUT, "output error"),
    ("builtins:FileExistsError", EXIT_OUTPUT, "output error"),
    ("labelmill.store.lock:LockHeld", EXIT_LOCK_HELD, "lock held"),
    ("labelmill.store.lock:LockLost", EXIT_ERROR, "lock lost"),
    ("labelmill.export.base:ExportError", None, "export error"),
    ("labelmill.training.errors:TrainingError", None, None),
    ("labelmill.engine.runtime:RayStartError", EXIT_ERROR, "ray error"),
    ("labelmill.engine.executor:PipelineStalled", EXIT_ERROR, ""),
)


def _causes(exc: BaseException):
    """``exc`` and what it wraps: ``__cause__``/``__context__`` chains and Ray's ``cause`` (a worker's error)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classify(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the one line ``labelmill`` prints for an error it knows, else None (a bug: traceback).

    The one place that maps errors to exit codes; every command goes through it (``labelmill.cli.main``).
    Storage failures (no space left, no credentials, network) anywhere, also inside a Ray worker, are one
    ``storage error`` line with exit code 1: an infrastructure failure, which a later retry may get past.
    """
    import errno

    if isinstance(exc, KeyboardInterrupt):  # a command may say where it stopped and how to go on
        return EXIT_INTERRUPTED, f"interrupted: {exc}" if str(exc) else "interrupted"
    if isinstance(exc, BrokenPipeError):
        return EXIT_PIPE_CLOSED, ""
    for e in _causes(exc):
        names = {f"{c.__module__}:{c.__qualname__}" for c in type(e).__mro__}
        for name, code, prefix in _KNOWN:
            if name in names:
                code = getattr(e, "exit_code", EXIT_ERROR) if code is None else code
                prefix = type(e).__name__ if prefix is None else prefix
                return code, f"{prefix}: {_first_line(e)}" if prefix else _first_line(e)
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            return EXIT_ERROR, (f"storage error: no space left on device{where}; committed shards are kept, "
                                "free some space and re-run the same command to resume")
    from labelmill.io.shards import is_transient, storage_message

    for e in _causes(exc):
        if is_transient(e) and not isinstance(e, (KeyboardInterrupt, BrokenPipeError)):
            return EXIT_ERROR, f"storage error: {storage_message(e, 'storage_options')}"
    return None


def exit_code_from_log(lines: Iterable[str]) -> int | None:
    """The ``exit_code`` of the last JSON summary line in a job's log, or None if there is none."""
    code = None
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("exit_code"), int):
            code = data["exit_code"]
    return code
