"""What every writer of an output needs around a run: its id, its lock, and what its version records say."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Iterator

from labelmill.store.lock import OutputLock
from labelmill.store.refresh_plan import LabelInputs, inputs_key


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def version_info(cfg: Any, run_id: str) -> tuple[dict, dict]:
    """(fields of every version record, fields of every committed shard item) for a run of ``cfg``.

    The record names today's :class:`LabelInputs` once, and every shard item
    its key: a refresh plans from the records alone, without reading tables.
    """
    from labelmill.teachers.base import config_hash

    today = LabelInputs.from_config(cfg)
    key = inputs_key(today)
    info = {"run_id": run_id, "config_hash": cfg.label_hash(),
            "teacher_hashes": {t.instance_name: config_hash(t.model_dump(mode="json")) for t in cfg.teachers},
            "label_inputs": {key: today.to_dict()},
            "vocabularies": {t.instance_name: names for t in cfg.teachers if (names := t.class_names())}}
    return info, {"inputs": key}


@contextlib.contextmanager
def writer_lock(cfg: Any, command: str, preflight: bool = True) -> Iterator[OutputLock]:
    """Hold the output's writer lock (:class:`~labelmill.store.lock.LockHeld` at once when another writer runs),
    then check what is slower to check: every teacher's weights (:func:`labelmill.engine.preflight.preflight`).

    So a second writer is refused before any weights resolve or Ray starts; a failure here releases the lock,
    and an output the lock created is removed again (nothing is left behind).
    """
    lock = OutputLock(cfg.output.path, cfg.output.storage_options, command=command).acquire()
    try:
        if preflight:
            from labelmill.engine.preflight import preflight as check_teachers

            check_teachers(cfg)
        yield lock
    finally:
        lock.release()
        lock.remove_if_only_lock()
