"""The stage abstraction: one job, its resources, and a column contract.

A stage is a small class:

* ``requires`` / ``produces`` / ``drops`` declare the columns it reads,
  writes and removes (names from :class:`labelmill.schemas.tables.Col`).
  :func:`check_contract` verifies a pipeline before anything runs.
* ``resources()`` says what one worker of the stage reserves in Ray.
* ``setup()`` runs once per worker (load a model, open a client);
  ``process_batch()`` runs for every batch.
* ``stateful = True`` stages run in a Ray actor pool (setup is costly and
  kept); others run as Ray tasks.

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


class Stage(ABC):
    name: ClassVar[str] = "stage"
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = False
    batch_format: ClassVar[str] = "pyarrow"

    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Once per worker, before the first batch."""

    @abstractmethod
    def process_batch(self, batch: Batch) -> Any:
        """Transform one batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resources()})"


class ContractError(ValueError):
    """A stage needs a column that no earlier stage provides."""


def check_contract(stages: Sequence[Stage], initial: Iterable[str] = ()) -> list[str]:
    """Walk the stages in order; return the final columns or raise ContractError."""
    columns = list(initial)
    for stage in stages:
        missing = [c for c in stage.requires if c not in columns]
        if missing:
            raise ContractError(
                f"stage {stage.name!r} requires {missing}, but only {sorted(columns)} are available"
            )
        for col in stage.produces:
            if col not in columns:
                columns.append(col)
        columns = [c for c in columns if c not in stage.drops]
    return columns


class _Chain:
    """Runs several stages back to back in one Ray worker (one operator).

    Stateless stages after a stateful one (the filter after the label
    actor) are fused into it: no extra Ray operator, task or object
    transfer per batch, which matters on small CPU machines.
    """

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        self._ready = False

    def _setup(self) -> None:
        if not self._ready:
            for stage in self.stages:
                stage.setup()
            self._ready = True

    def __call__(self, batch: Batch) -> Any:
        self._setup()
        for stage in self.stages:
            batch = stage.process_batch(batch)
        return batch


class _ActorAdapter(_Chain):
    """Callable class Ray Data instantiates once per actor; setup happens there."""

    def __init__(self, stages: Sequence[Stage]):
        super().__init__(stages)
        self._setup()


def fuse(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Group stages into Ray operators: a stateless stage joins the operator before it."""
    groups: list[list[Stage]] = []
    for stage in stages:
        if groups and not stage.stateful and stage.batch_format == groups[-1][-1].batch_format:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def apply_stages(dataset, stages: Sequence[Stage], *, batch_size: int | None, concurrency: int | None = None):
    """Append fused ``stages`` to a Ray ``Dataset``: one map operator, resources of its first stage."""
    head = stages[0]
    kwargs: dict[str, Any] = dict(
        batch_format=head.batch_format, batch_size=batch_size, zero_copy_batch=True, **head.resources().ray_args()
    )
    if head.stateful:
        from ray.data import ActorPoolStrategy

        return dataset.map_batches(
            _ActorAdapter,
            fn_constructor_args=(list(stages),),
            compute=ActorPoolStrategy(size=concurrency or 1),
            **kwargs,
        )
    if concurrency:
        kwargs["concurrency"] = concurrency
    return dataset.map_batches(_Chain(stages), **kwargs)
