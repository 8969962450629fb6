"""Checks that run on the driver before any Ray work starts."""

from __future__ import annotations

from labelmill.config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """Fail fast (with the teacher's own message) if a teacher cannot start."""
    for teacher in cfg.teachers:
        teacher.preflight(cfg.allow_random_init)
