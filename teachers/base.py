"""The teacher plug-in interface.

A teacher turns a batch of decoded images into labels.  labelmill ships
``maskclip``, ``glip`` and ``vild``; a user adds their own without editing
labelmill by writing a subclass of :class:`Teacher` and naming it in the run
config by class path::

    teachers:
      - type: my_pkg.my_module:MyTeacher
        my_option: 3

or by registering it under the ``labelmill.teachers`` entry-point group and
using the short name.

Life cycle (the pipeline's stages drive it):

1. ``Config`` (a pydantic model) validates the teacher's section of the run
   config before any work starts.  Unknown keys are errors.  The built-in
   configs live in :mod:`labelmill.teachers.configs` and import no torch, so
   validating a config never loads a network.
2. ``__init__(config, device, allow_random_init)`` loads weights, once per
   device actor.  It must raise :class:`WeightsError` when weights are
   missing, never fall back to random initialisation unless
   ``allow_random_init`` is true.
3. ``predict(batch, upstream)`` is called for every batch.  It returns one
   :class:`~labelmill.schemas.records.TeacherOutput` per image, with boxes
   and masks in original-image pixels.  ``upstream`` holds what the teachers
   that ran before it on the same batch produced (the ViLD embedder uses
   GLIP's boxes this way).  A teacher with only ``predict`` runs it whole in
   the device process (the ``infer`` stage).

**The device/host split** (what the built-in teachers do, so that a GPU is
never bounded by one Python process): the config names a
:class:`HostSide` (``host_side_path``), a light object built from the config
alone (no weights, no torch) that the CPU pools hold:

* ``HostSide.prepare`` runs in the ``prepare`` stage and computes per-image
  inputs on the host (GLIP: the caption's noun phrases and tokens);
* ``Teacher.infer_async`` runs in the ``infer`` stage: forward, device
  post-processing and one device-to-host copy of compact per-batch arrays
  (a :class:`~labelmill.schemas.raw.RawBatch`); no per-image Python over
  pixels, no RLE, no label rows;
* ``HostSide.finish`` runs in the ``finish`` stage and turns those arrays
  into :class:`TeacherOutput`\\ s (COCO RLE, label rows).

``predict`` must equal ``host.finish(infer_async(...).result(), ...)``
(:meth:`Teacher.predict_split` is exactly that).

Options every teacher accepts (:class:`TeacherConfig`): ``batch_size``
(images per forward; the infer stage cuts its batches to it),
``channels_last`` and ``compile`` (see :meth:`Teacher.apply_gpu_options`).
Precision is each teacher's own ``precision`` key where it has one
(``auto`` = bf16 autocast on CUDA, fp32 on CPU).

Importing this module does not import torch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labelmill.models.common import WeightsError, config_hash, file_sha256  # noqa: F401  (public API)

__all__ = ["WeightsError", "config_hash", "file_sha256", "ImageRequest", "TeacherConfig", "Teacher", "HostSide",
           "ImageBatch", "FinishInfo", "Pending", "Upstream", "build_teacher", "host_side", "validate_teacher_config"]
from labelmill.schemas.records import ImageRequest, Provenance, TeacherOutput

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from labelmill.schemas.raw import RawBatch


#: TeacherConfig keys that change speed, never labels: left out of config hashes
PERFORMANCE_KEYS = frozenset({"batch_size", "channels_last", "compile"})


class TeacherConfig(BaseModel):
    """Fields every teacher accepts.  Subclasses add their own."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    #: ``module:Class`` of the teacher's :class:`HostSide` (None: not split; ``predict`` runs whole in ``infer``)
    host_side_path: ClassVar[str | None] = None
    #: whether the teacher writes label rows (masks, boxes); False for one that writes regions only (ViLD)
    emits_labels: ClassVar[bool] = True

    type: str
    name: str | None = Field(
        default=None, description="instance name written with every label; defaults to the type"
    )
    batch_size: int | None = Field(
        default=None, gt=0, description="images per forward of this teacher; default: ray.batch_size"
    )
    channels_last: bool = Field(default=False, description="convert the teacher's networks to channels_last")
    compile: bool = Field(default=False, description="torch.compile the teacher's networks (first batches slow)")

    def label_dump(self) -> dict[str, Any]:
        """The config as JSON data, without the speed-only keys (what label hashes cover)."""
        return self.model_dump(mode="json", exclude=set(PERFORMANCE_KEYS))

    @property
    def instance_name(self) -> str:
        return self.name or self.type.rsplit(":", 1)[-1].lower()

    @property
    def split(self) -> bool:
        """Whether the teacher's host work runs in the CPU pools (see the module docstring)."""
        return self.host_side_path is not None

    def image_request(self) -> ImageRequest:
        """Working resolution the decoder must deliver; plug-ins override this."""
        return ImageRequest(short_side=800, max_long_side=1333)

    def class_names(self) -> list[str] | None:
        """The teacher's class names by class id, registered with the output when a run commits
        (:mod:`labelmill.store.classes`: their ids never move); None for a teacher without classes.
        The default reads a ``vocabulary`` field; plug-ins with classes of their own override this."""
        spec = getattr(self, "vocabulary", None)
        if spec is None:
            return None
        from labelmill.teachers.vocab import load_vocabulary

        if hasattr(spec, "model_dump"):
            spec = spec.model_dump()
        return list(load_vocabulary(spec).names)

    def preflight(self, allow_random_init: bool) -> None:
        """Cheap checks on the driver before Ray starts (weights exist, ...).

        Raise :class:`WeightsError` (or ValueError) to stop the run early.
        """

    def check_upstream(self, earlier: dict[str, "TeacherConfig"]) -> None:
        """Validate references to teachers that run before this one.

        ``earlier`` maps instance names to the configs of the teachers listed
        before this one in the run.  A teacher that reads ``upstream``
        outputs raises ValueError here when it names one that is missing.
        """


@dataclass
class ImageBatch:
    """Decoded images handed to teachers.

    Image ``i`` is a uint8 (H, W, 3) tensor on the teacher's device:
    ``images[i]`` where the stage gives one tensor per image (views into the
    batch's one flat buffer), else ``canvas[i, :work_hw[i][0], :work_hw[i][1]]``
    of a (B, S, S, 3) canvas.  Original sizes are after EXIF rotation; labels
    must be expressed in them.
    """

    canvas: "torch.Tensor | None"
    work_hw: list[tuple[int, int]]
    orig_hw: list[tuple[int, int]]
    captions: list[str | None]
    keys: list[str]
    metas: list[dict[str, Any]]
    #: the same images as host uint8 (h, w, 3) arrays when the stage has them
    #: (CPU decode); lets a teacher that preprocesses on the host skip a copy back
    host: list[np.ndarray] | None = None
    images: "list[torch.Tensor] | None" = None

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> "torch.Tensor":
        """Image ``i`` as a uint8 (H, W, 3) tensor."""
        if self.images is not None:
            return self.images[i]
        h, w = self.work_hw[i]
        return self.canvas[i, :h, :w]

    def host_image(self, i: int) -> np.ndarray:
        """Image ``i`` as a host uint8 (H, W, 3) array (copied back only if needed)."""
        if self.host is not None:
            return self.host[i]
        return self.image(i).cpu().numpy()

    def subset(self, idx: Sequence[int]) -> "ImageBatch":
        idx = list(idx)
        return ImageBatch(
            canvas=None if self.canvas is None else self.canvas[idx],
            work_hw=[self.work_hw[i] for i in idx],
            orig_hw=[self.orig_hw[i] for i in idx],
            captions=[self.captions[i] for i in idx],
            keys=[self.keys[i] for i in idx],
            metas=[self.metas[i] for i in idx],
            host=None if self.host is None else [self.host[i] for i in idx],
            images=None if self.images is None else [self.images[i] for i in idx],
        )


class Pending:
    """Results of a batch that may still be on their way from the device."""

    def __init__(self, finish: Callable[[], Any]):
        self._finish = finish

    @classmethod
    def ready(cls, outputs: Any) -> "Pending":
        return cls(lambda: outputs)

    def result(self) -> Any:
        return self._finish()


@dataclass
class FinishInfo:
    """What the finish stage knows of each image of a batch (no pixels)."""

    keys: list[str]
    orig_hw: list[tuple[int, int]]
    captions: list[str | None]
    metas: list[dict[str, Any]]
    #: per image: what :meth:`HostSide.prepare` produced for it (None where it prepares nothing)
    prepared: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, batch: ImageBatch, prepared: list[Any] | None = None) -> "FinishInfo":
        return cls(list(batch.keys), [tuple(hw) for hw in batch.orig_hw], list(batch.captions), list(batch.metas),
                   prepared)

    def subset(self, idx: Sequence[int]) -> "FinishInfo":
        pick = list(idx)
        return FinishInfo([self.keys[i] for i in pick], [self.orig_hw[i] for i in pick],
                          [self.captions[i] for i in pick], [self.metas[i] for i in pick],
                          None if self.prepared is None else [self.prepared[i] for i in pick])


class HostSide:
    """The host part of a split teacher, built from its config alone (no weights, no device, no torch).

    One lives in every CPU-pool worker (:func:`host_side`, cached per process)
    and in the device teacher itself (``Teacher.host``), so ``predict`` and
    the three-stage pipeline share the same code.
    """

    def __init__(self, config: TeacherConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.instance_name

    def prepared_type(self) -> "pa.DataType | None":
        """Arrow type of one image's prepared inputs; None: this teacher prepares nothing."""
        return None

    def prepare(self, captions: list[str | None], metas: list[dict[str, Any]]) -> list[Any]:
        """Per image: inputs computed on the host before the forward (values of :meth:`prepared_type`)."""
        return [None] * len(captions)

    def raw_fields(self) -> dict[str, tuple]:
        """The raw results' layout, ``{name: (numpy dtype, inner shape)}``, fixed by the config (so every
        batch's ``raw.<teacher>`` column has the same Arrow type, also when no image ran)."""
        raise NotImplementedError

    def finish(self, raw: "RawBatch", info: FinishInfo) -> list[TeacherOutput | None]:
        """Per image: the outputs, from the batch's raw device results; None where ``raw.valid`` is false."""
        raise NotImplementedError

    def proposals(self, raw: "RawBatch", i: int, orig_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s boxes (N, 4) xyxy in original pixels and scores (N,), for a later teacher."""
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)


class Upstream:
    """What a later teacher of the same forward sees of one image's split-teacher result."""

    def __init__(self, host: HostSide, raw: "RawBatch", i: int, orig_hw: tuple[int, int]):
        self.host, self.raw, self.i, self.orig_hw = host, raw, i, tuple(orig_hw)
        self.extras = raw.extras[i] if raw.extras is not None else {}

    def proposal_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.host.proposals(self.raw, self.i, self.orig_hw)


def upstream_views(host: HostSide, raw: "RawBatch", orig_hw: Sequence[tuple[int, int]]) -> list[Upstream | None]:
    """A later teacher's view of each image's result (None where the teacher produced nothing)."""
    return [Upstream(host, raw, i, orig_hw[i]) if raw.valid[i] else None for i in range(len(raw))]


_HOSTS: dict[tuple[str, str], HostSide] = {}


def host_side(config: TeacherConfig) -> HostSide | None:
    """The :class:`HostSide` of ``config`` (None if the teacher is not split), built once per process."""
    if config.host_side_path is None:
        return None
    key = (config.host_side_path, config.model_dump_json())
    if key not in _HOSTS:
        _HOSTS[key] = _load(config.host_side_path, f"host side of teacher {config.type!r}")(config)
    return _HOSTS[key]


class Teacher(ABC):
    """Base class of every teacher plug-in."""

    #: pydantic model validating this teacher's config section
    Config: ClassVar[type[TeacherConfig]] = TeacherConfig
    #: short type name used in configs (``type: maskclip``)
    type_name: ClassVar[str] = ""

    def __init__(self, config: TeacherConfig, device: "torch.device", allow_random_init: bool = False):
        self.config = config
        self.device = device
        self.allow_random_init = allow_random_init
        self.host = host_side(config)

    @property
    def name(self) -> str:
        return self.config.instance_name

    def image_request(self) -> ImageRequest:
        """Resolution this teacher needs from the decoder (from its config)."""
        return self.config.image_request()

    @abstractmethod
    def provenance(self) -> Provenance:
        """Teacher name, weights id and hash, config hash."""

    @abstractmethod
    def predict(self, batch: ImageBatch, upstream: dict[str, list]) -> list[TeacherOutput]:
        """Label every image of ``batch``; one output per image, in order."""

    def predict_async(self, batch: ImageBatch, upstream: dict[str, list]) -> Pending:
        """Queue the batch's device work; the returned :class:`Pending` finishes on the host."""
        return Pending.ready(self.predict(batch, upstream))

    # ------------------------------------------------------------ the split
    def infer_async(self, batch: ImageBatch, upstream: dict[str, list], prepared: list[Any] | None) -> Pending:
        """Split teachers: queue forward and device post-processing, start the one copy back; the
        :class:`Pending` gives a :class:`RawBatch` (``extras`` may carry device objects for later teachers)."""
        raise NotImplementedError(f"teacher {self.name!r} does not implement the device/host split")

    def predict_split(self, batch: ImageBatch, upstream: dict[str, list]) -> list[TeacherOutput]:
        """``predict`` of a split teacher: prepare, infer and finish in this process."""
        prepared = self.host.prepare(list(batch.captions), list(batch.metas))
        raw = self.infer_async(batch, upstream, prepared).result()
        outs = self.host.finish(raw, FinishInfo.of(batch, prepared))
        for out, extras in zip(outs, raw.extras or [{}] * len(outs)):
            if out is not None and extras:
                out.extras.update(extras)
        return outs

    def torch_modules(self) -> list:
        """The networks ``channels_last``/``compile`` apply to: by default the module attributes."""
        import torch

        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def apply_gpu_options(self) -> None:
        """Apply the config's ``channels_last`` and ``compile`` to :meth:`torch_modules`."""
        import torch

        for module in self.torch_modules():
            if self.config.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.config.compile:
                module.compile(dynamic=None)

    def clip_provenance(self, weights: str, sha256: str) -> Provenance:
        """Provenance of a teacher whose weights are one file (or random init)."""
        return Provenance(
            teacher=self.name,
            teacher_type=self.config.type,
            weights=weights,
            weights_sha256=sha256,
            teacher_config_hash=self.config_hash(),
        )

    def needs_caption(self) -> bool:
        """True if an image without a caption cannot be labelled."""
        return False

    def config_hash(self) -> str:
        return config_hash(self.config.label_dump())


# --------------------------------------------------------------------------
# Registry: built-in types name their config and teacher classes by path, so
# validating a config imports the (torch-free) config module only
# --------------------------------------------------------------------------

_BUILTIN = {
    "maskclip": ("labelmill.teachers.configs:MaskCLIPConfig", "labelmill.teachers.maskclip:MaskCLIPTeacher"),
    "glip": ("labelmill.teachers.configs:GLIPTeacherConfig", "labelmill.teachers.glip:GLIPTeacher"),
    "vild": ("labelmill.teachers.configs:ViLDConfig", "labelmill.teachers.vild:ViLDEmbedder"),
    "null": ("labelmill.teachers.configs:NullTeacherConfig", "labelmill.teachers.null:NullTeacher"),
    "student": ("labelmill.teachers.configs:StudentTeacherConfig", "labelmill.teachers.student:StudentTeacher"),
}


def _load(target: str, what: str):
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what}: module {module_name!r} has no {attr!r}") from None


def resolve_teacher_class(type_name: str) -> type[Teacher]:
    """Find the class for ``type`` in a config: built-in, entry point or class path."""
    if type_name in _BUILTIN:
        cls = _load(_BUILTIN[type_name][1], f"teacher {type_name!r}")
    else:
        cls = None
        for ep in entry_points(group="labelmill.teachers"):
            if ep.name == type_name:
                cls = ep.load()
                break
        if cls is None:
            if ":" not in type_name:
                known = sorted(_BUILTIN)
                raise ValueError(
                    f"unknown teacher type {type_name!r}: use one of {known}, an entry point of "
                    "group 'labelmill.teachers', or a class path 'package.module:ClassName'"
                )
            cls = _load(type_name, f"teacher {type_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"teacher {type_name!r} resolves to {cls!r}, which is not a labelmill Teacher")
    return cls


def resolve_config_class(type_name: str) -> type[TeacherConfig]:
    """The config class of a teacher type (built-ins without importing the teacher, or torch)."""
    if type_name in _BUILTIN:
        return _load(_BUILTIN[type_name][0], f"teacher {type_name!r}")
    return resolve_teacher_class(type_name).Config


def validate_teacher_config(section: dict[str, Any]) -> TeacherConfig:
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError("each teacher needs a 'type'")
    if not isinstance(section["type"], str):
        hint = " (YAML reads a bare null as nothing: write type: \"null\")" if section["type"] is None else ""
        raise ValueError(f"teacher type must be a string, not {section['type']!r}{hint}")
    return resolve_config_class(section["type"]).model_validate(section)


def build_teacher(config: TeacherConfig, device: "torch.device", allow_random_init: bool = False) -> Teacher:
    cls = resolve_teacher_class(config.type)
    return cls(config, device, allow_random_init=allow_random_init)


def boxes_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, 2:] -= out[:, :2]
    return out
