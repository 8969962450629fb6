"""Errors a training run reports with a one-line message and an exit code."""

from __future__ import annotations

from labelmill.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_INPUT, EXIT_WEIGHTS


class TrainingError(RuntimeError):
    """Base of the training errors; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_ERROR


class NoUsableLabels(TrainingError):
    """The dataset version has no label a student can learn from."""

    exit_code = EXIT_INPUT


class VocabularyMismatch(TrainingError):
    """Teacher and student (or two checkpoints) disagree on the class list."""

    exit_code = EXIT_CONFIG


class ClusterTooSmall(TrainingError):
    """The trainer workers and the data side together ask for more than a fixed cluster has."""

    exit_code = EXIT_CONFIG


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, or not a plain tensor file."""

    exit_code = EXIT_WEIGHTS


def readable_or_raise(path: str) -> None:
    """Driver-side check that a weights file loads without running code from it (one line, exit 3)."""
    from labelmill.models.common import WeightsError
    from labelmill.models.safe_load import check_readable

    try:
        check_readable(path)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
