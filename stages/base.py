"""The stage abstraction: one job, its resources, and a column contract.

A stage is a small class:

* ``requires`` / ``produces`` / ``drops`` declare the columns it reads,
  writes and removes (names from :class:`labelmill.schemas.tables.Col`).
  :func:`check_contract` verifies a pipeline before anything runs.
* ``resources()`` says what one worker of the stage reserves in Ray.
* ``setup()`` runs once per worker (load a model, open a client);
  ``process_batch()`` runs for every batch.
* ``stateful = True`` stages run in a Ray actor pool (setup is costly and
  kept); others run as Ray tasks, or inside the operator before them
  (the engine fuses a stateless stage into its predecessor).
* ``role`` says what the engine should do with it: ``source`` (reads the
  inputs), ``model`` (the expensive, accelerator-hungry stage the actor
  pool is sized for), ``write`` (writes the output tables on the workers
  and returns manifests), or ``transform``.  The engine finds stages by
  name or role, never by position.
* ``place()`` receives the resources the engine's plan gives the stage.

Stages never import Ray; :mod:`labelmill.engine` runs them.

Batches are ``pyarrow.Table`` objects in and out (Ray Data's ``pyarrow``
batch format), so nullable and nested columns pass through untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

Batch = Any  # a pyarrow.Table unless the stage sets another batch_format


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage reserves from the Ray scheduler."""

    cpus: float = 1.0
    gpus: float = 0.0

    def ray_args(self) -> dict[str, float]:
        args = {"num_cpus": self.cpus}
        if self.gpus:
            args["num_gpus"] = self.gpus
        return args

    def request(self) -> dict[str, float]:
        """What one worker needs from one node, in Ray's resource names."""
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v}


class Stage(ABC):
    name: ClassVar[str] = "stage"
    role: ClassVar[str] = "transform"
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()
    #: the output holds only ``produces`` (a stage that turns rows into manifests)
    replaces_columns: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    batch_format: ClassVar[str] = "pyarrow"
    #: engine batches per call of a stateful stage (one that overlaps its own batches inside a call
    #: asks for several: batches are not overlapped across calls)
    batches_per_call: int = 1
    #: calls one actor of a stateful stage runs at once (threads; None: 2 on a GPU plan, else 1); a stage
    #: allowing more than 1 must be thread-safe
    concurrent_calls: int | None = 1

    def resources(self) -> Resources:
        return Resources(cpus=getattr(self, "cpus", 1.0), gpus=getattr(self, "gpus", 0.0))

    def place(self, resources: Resources, threads: int | None = None) -> None:
        """Take the reservation the engine's resource plan gives this stage."""
        self.cpus = resources.cpus
        self.gpus = resources.gpus

    def bytes_per_row(self) -> int | None:
        """Rough size of one output row in the object store (for the engine's budget), if large."""
        return None

    def setup(self) -> None:
        """Once per worker, before the first batch."""

    @abstractmethod
    def process_batch(self, batch: Batch) -> Any:
        """Transform one batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resources()})"


class ContractError(ValueError):
    """A stage needs a column that no earlier stage provides."""


def check_contract(stages: Sequence[Any], initial: Iterable[str] = ()) -> list[str]:
    """Walk every hop of the stages in order; return the final columns or raise ContractError."""
    columns = list(initial)
    previous = None
    for stage in stages:
        missing = [c for c in stage.requires if c not in columns]
        if missing:
            hop = f"{previous.name!r} -> {stage.name!r}" if previous is not None else f"-> {stage.name!r}"
            raise ContractError(
                f"hop {hop}: stage {stage.name!r} requires column(s) {missing}, but only "
                f"{sorted(columns)} are available"
            )
        if getattr(stage, "replaces_columns", False):
            columns = []
        for col in stage.produces:
            if col not in columns:
                columns.append(col)
        columns = [c for c in columns if c not in stage.drops]
        previous = stage
    return columns
