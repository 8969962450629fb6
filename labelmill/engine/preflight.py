"""Checks that run on the driver before any Ray work starts (after the input, output and lock checks)."""

from __future__ import annotations

from labelmill.config import ConfigError, RunConfig


def preflight(cfg: RunConfig) -> None:
    """Fail fast, in one line, if a teacher cannot start: weights missing or unreadable (WeightsError, with
    the teacher's own message), or settings that conflict (a config error naming the teacher)."""
    for i, teacher in enumerate(cfg.teachers):
        try:
            teacher.preflight(cfg.allow_random_init)
        except ValueError as exc:
            raise ConfigError(f"teachers.{i} ({teacher.instance_name}): {exc}") from None
