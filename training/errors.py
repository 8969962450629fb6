"""Errors a training run reports with a one-line message and an exit code."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Base of the training errors; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class NoUsableLabels(TrainingError):
    """The dataset version has no label a student can learn from."""

    exit_code = 4


class VocabularyMismatch(TrainingError):
    """Teacher and student (or two checkpoints) disagree on the class list."""

    exit_code = 2


class ClusterTooSmall(TrainingError):
    """The trainer workers and the data side together ask for more than a fixed cluster has."""

    exit_code = 2


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, or not a plain tensor file."""

    exit_code = 3
