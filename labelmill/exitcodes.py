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
}

#: codes a scheduler should count as success
SUCCESS = frozenset({EXIT_PUBLISHED, EXIT_NOTHING_TO_DO})
#: codes where retrying the same command soon cannot help (alert a person)
PERMANENT = frozenset({EXIT_CONFIG, EXIT_WEIGHTS, EXIT_INPUT, EXIT_OUTPUT})


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
