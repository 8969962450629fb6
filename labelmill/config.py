"""Run configuration: YAML in, validated pydantic objects out.

Everything is checked before any work starts: unknown keys, wrong types,
impossible values and unknown teacher types are reported together with the
path of the offending key (``teachers.0.image_size: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from labelmill.teachers.base import TeacherConfig, config_hash, validate_teacher_config


class ConfigError(ValueError):
    """The run configuration is invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputConfig(_Strict):
    shards: str | list[str] = Field(
        description="folder, glob, brace pattern, s3://bucket/prefix, or a list of those"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, e.g. {endpoint_url: http://host:9000} for S3; credentials come "
        "from the standard AWS chain unless given here",
    )
    max_image_pixels: int = Field(default=90_000_000, gt=0, description="decompression-bomb guard")
    samples_per_block: int = Field(default=64, gt=0, description="rows per block the reader emits")
    read_attempts: int = Field(
        default=5, gt=0,
        description="tries to open and read a shard through storage errors (missing for a moment, 5xx, "
        "timeouts, a dropped connection); a shard still unreadable is recorded as failed, not done, and the "
        "next run retries it",
    )
    read_backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles per try (max 30 s)")


class OutputConfig(_Strict):
    path: str = Field(description="output folder (local or s3://)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    commit_every_shards: int = Field(default=4, gt=0, description="shards per atomic commit")
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class RayConfig(_Strict):
    address: str | None = Field(
        default=None, description="cluster address; default: $RAY_ADDRESS, else an embedded local Ray"
    )
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs of the embedded local Ray")
    teacher_actors: int | None = Field(
        default=None, gt=0, description="a fixed number of label actors; default: one per GPU, else 1"
    )
    min_actors: int | None = Field(
        default=None, gt=0, description="autoscaling label-actor pool: fewest actors (default 1 on a cluster)"
    )
    max_actors: int | None = Field(
        default=None, gt=0,
        description="autoscaling label-actor pool: most actors; the pool grows while work is queued and the "
        "cluster autoscaler adds GPU nodes for it",
    )
    read_tasks_per_actor: float | None = Field(
        default=None, gt=0,
        description="read+decode tasks per label actor (default 2 per GPU actor, 1 per CPU actor); "
        "read concurrency follows the actor pool",
    )
    gpus_per_actor: float | None = Field(
        default=None, ge=0, description="GPUs of one infer actor; default: 1 / actors_per_gpu if the cluster has "
        "GPUs, else 0")
    actors_per_gpu: int = Field(
        default=1, gt=0, description="infer actors sharing one GPU (each reserves 1/N of it): more device processes "
        "where one process's host work per batch is the limit")
    infer_calls_per_actor: int | None = Field(
        default=None, ge=1, le=8,
        description="calls one infer actor runs at once (threads; the forwards take turns under one device lock); "
        "default 2 on a GPU plan (one call's collection overlaps the next call's forwards, so the device does not "
        "wait between calls), 1 on a CPU plan (where both would compete for the same cores and memory). Ray Data "
        "grows the pool when 1.75 x this many tasks wait per actor")
    host_cpus_per_gpu: float | None = Field(
        default=None, gt=0, description="CPUs per GPU for the prepare tasks and finish actors (the host work); "
        "default: a GPU node's CPUs minus one, divided by its GPUs")
    finish_actors: int | None = Field(
        default=None, gt=0, description="most finish actors (RLE, label rows, filter, table writer); default: half "
        "of host_cpus_per_gpu per GPU on a GPU plan, 1 on a CPU plan (the pool grows from 1 while work queues)")
    finish_cpus: float | None = Field(
        default=None, gt=0, description="CPU reservation of one finish actor (default 0.5 on a GPU plan, 0.25 on CPU)")
    cpus_per_actor: float | None = Field(default=None, gt=0, description="CPU reservation of a label actor")
    torch_threads: int | None = Field(default=None, gt=0, description="intra-op threads in a label actor")
    batch_size: int = Field(default=32, gt=0, description="images per teacher forward")
    object_store_budget_mb: int | None = Field(
        default=None, gt=0,
        description="cap on Ray Data's object-store use (backpressure keeps memory flat); "
        "default: room for eight forward batches of decoded images per label actor, at least 256 MB",
    )
    read_tasks: int | None = Field(
        default=None, gt=0,
        description="concurrent read+decode tasks (each streams whole shards); "
        "default read_tasks_per_actor x the largest actor count",
    )
    read_cpus: float = Field(default=0.25, gt=0, description="CPU reservation of one read+decode task")
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each label actor reserves, e.g. {teacher_node: 1} to pin the "
        "label actors to nodes started with that resource",
    )
    stall_timeout_s: float = Field(
        default=600.0, gt=0,
        description="no progress for this long while some stage's work fits on no live node (e.g. the only "
        "GPU node died): the run fails naming the missing resources. On an autoscaling cluster (reached by "
        "address) it first reports that it is waiting for nodes, and fails after twice this time",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decode: Literal["tasks", "actor"] = Field(
        default="tasks",
        description="where images are decoded: 'tasks' (Ray CPU tasks before the label actors; decoded "
        "pixels travel through the object store) or 'actor' (raw bytes travel; the label actor decodes "
        "each forward batch itself, with nvJPEG on a GPU and PIL for what nvJPEG cannot read)",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> "RayConfig":
        if self.actors_per_gpu > 1 and self.gpus_per_actor is not None:
            raise ValueError("give either actors_per_gpu or gpus_per_actor (actors_per_gpu: N means 1/N GPU each)")
        if self.min_actors and self.max_actors and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) is larger than max_actors ({self.max_actors})")
        if self.teacher_actors and (self.min_actors or self.max_actors):
            raise ValueError("give either teacher_actors (a fixed pool) or min_actors/max_actors (autoscaling)")
        return self


class FilterConfig(_Strict):
    min_score: float = Field(default=0.0, ge=0, le=1)
    per_class_min_score: dict[str, float] = Field(default_factory=dict)
    min_area: float = Field(default=0.0, ge=0, description="minimum mask (or box) area in pixels")
    max_labels_per_image: int | None = Field(default=None, gt=0)

    @field_validator("per_class_min_score")
    @classmethod
    def _scores_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]: {bad}")
        return value


class RunConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    teachers: list[SerializeAsAny[TeacherConfig]] = Field(min_length=1)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    allow_random_init: bool = Field(
        default=False,
        description="only the demo sets this; labels then record weights_sha256=random-init",
    )
    progress_interval_s: float | None = Field(
        default=None, gt=0, description="seconds between status lines; default 2 on a terminal, 30 into a log")

    @field_validator("teachers", mode="before")
    @classmethod
    def _teachers(cls, value: Any) -> list[TeacherConfig]:
        if not isinstance(value, list):
            raise ValueError("teachers must be a list")
        out = []
        for i, section in enumerate(value):
            if isinstance(section, TeacherConfig):
                out.append(section)
                continue
            try:
                out.append(validate_teacher_config(section))
            except ValidationError as exc:
                raise ValueError(_format_errors(exc, prefix=f"teachers.{i}")) from None
            except ValueError as exc:
                raise ValueError(f"teachers.{i}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        names = [t.instance_name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; give 'name' to tell apart {dupes}")
        earlier: dict[str, TeacherConfig] = {}
        for i, teacher in enumerate(self.teachers):
            try:
                teacher.check_upstream(dict(earlier))
            except ValueError as exc:
                raise ValueError(f"teachers.{i}: {exc}") from None
            _check_vocabulary(i, getattr(teacher, "vocabulary", None))
            earlier[teacher.instance_name] = teacher
        return self

    def label_hash(self) -> str:
        """Hash of everything that decides the labels (not where they go or how fast)."""
        return config_hash(
            {
                "teachers": [t.label_dump() for t in self.teachers],
                "filter": self.filter.model_dump(mode="json"),
                "max_image_pixels": self.input.max_image_pixels,
                "allow_random_init": self.allow_random_init,
            }
        )


def _check_vocabulary(i: int, spec: Any) -> None:
    """A built-in vocabulary name or an inline list is checked with the config, before anything starts.

    (A ``{file: path}`` vocabulary is read where the teacher runs, which on a
    cluster may be a worker with files the driver lacks.)
    """
    if spec is None or not isinstance(spec, (str, list, tuple)):
        return
    from labelmill.teachers.vocab import load_vocabulary

    try:
        load_vocabulary(spec)
    except ValueError as exc:
        raise ValueError(f"teachers.{i}.vocabulary: {exc}") from None


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path or '<root>'}: {msg}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    path, _, raw = text.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _list_index(node, part, parts)
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:-1])} is not a mapping")


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {'.'.join(parts)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config.  Raises :class:`ConfigError`."""
    data = read_config_data(source, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def read_config_data(source: str | Path | dict, overrides: list[str] | None = None) -> dict:
    """A config mapping from YAML (or a dict, deep-copied) with ``key.path=value`` overrides applied."""
    if isinstance(source, dict):
        data = yaml.safe_load(yaml.safe_dump(source))  # deep copy
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping at the top level")
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    return data
