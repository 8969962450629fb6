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

Life cycle (the label stage drives it, once per Ray actor):

1. ``Config`` (a pydantic model) validates the teacher's section of the run
   config before any work starts.  Unknown keys are errors.
2. ``__init__(config, device, allow_random_init)`` loads weights.  It must
   raise :class:`WeightsError` when weights are missing, never fall back to
   random initialisation unless ``allow_random_init`` is true.
3. ``predict(batch, upstream)`` is called for every batch.  It returns one
   :class:`~labelmill.schemas.records.TeacherOutput` per image, with boxes
   and masks in original-image pixels.  ``upstream`` holds the outputs of the
   teachers that ran before it on the same batch (the ViLD embedder uses
   GLIP's boxes this way).

   A teacher that can finish on the host while the device already runs the
   next batch overrides ``predict_async`` instead: it queues the forward and
   the device-side post-processing, starts one device-to-host copy of the
   results (:class:`labelmill.models.transfer.HostCopy`) and returns a
   :class:`Pending` whose ``result()`` waits for that copy and builds the
   outputs (RLE, label rows).  The label stage calls ``result()`` on another
   thread, overlapped with the next forward.  ``predict`` must stay
   equivalent to ``predict_async(...).result()``.

Options every teacher accepts (:class:`TeacherConfig`): ``batch_size``
(images per forward; the label stage cuts its batches to it),
``channels_last`` and ``compile`` (see :meth:`Teacher.apply_gpu_options`).
Precision is each teacher's own ``precision`` key where it has one
(``auto`` = bf16 autocast on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from labelmill.models.common import WeightsError, config_hash, file_sha256  # noqa: F401  (public API)
from labelmill.schemas.records import ImageRequest, Provenance, TeacherOutput


#: TeacherConfig keys that change speed, never labels: left out of config hashes
PERFORMANCE_KEYS = frozenset({"batch_size", "channels_last", "compile"})


class TeacherConfig(BaseModel):
    """Fields every teacher accepts.  Subclasses add their own."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

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

    def image_request(self) -> ImageRequest:
        """Working resolution the decoder must deliver; plug-ins override this."""
        return ImageRequest(short_side=800, max_long_side=1333)

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

    ``canvas`` is a uint8 tensor (B, S, S, 3) on the teacher's device; image
    ``i`` occupies ``canvas[i, :work_hw[i][0], :work_hw[i][1]]``.  Original
    sizes are after EXIF rotation; labels must be expressed in them.
    """

    canvas: torch.Tensor
    work_hw: list[tuple[int, int]]
    orig_hw: list[tuple[int, int]]
    captions: list[str | None]
    keys: list[str]
    metas: list[dict[str, Any]]
    #: the same images as host uint8 (h, w, 3) arrays when the stage has them
    #: (CPU decode); lets a teacher that preprocesses on the host skip a copy back
    host: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 (H, W, 3) view of the canvas."""
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
            canvas=self.canvas[idx],
            work_hw=[self.work_hw[i] for i in idx],
            orig_hw=[self.orig_hw[i] for i in idx],
            captions=[self.captions[i] for i in idx],
            keys=[self.keys[i] for i in idx],
            metas=[self.metas[i] for i in idx],
            host=None if self.host is None else [self.host[i] for i in idx],
        )


class Pending:
    """Outputs of a batch that may still be on their way from the device."""

    def __init__(self, finish: Callable[[], list[TeacherOutput]]):
        self._finish = finish

    @classmethod
    def ready(cls, outputs: list[TeacherOutput]) -> "Pending":
        return cls(lambda: outputs)

    def result(self) -> list[TeacherOutput]:
        return self._finish()


class Teacher(ABC):
    """Base class of every teacher plug-in."""

    #: pydantic model validating this teacher's config section
    Config: ClassVar[type[TeacherConfig]] = TeacherConfig
    #: short type name used in configs (``type: maskclip``)
    type_name: ClassVar[str] = ""

    def __init__(self, config: TeacherConfig, device: torch.device, allow_random_init: bool = False):
        self.config = config
        self.device = device
        self.allow_random_init = allow_random_init

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
    def predict(
        self, batch: ImageBatch, upstream: dict[str, list[TeacherOutput]]
    ) -> list[TeacherOutput]:
        """Label every image of ``batch``; one output per image, in order."""

    def predict_async(self, batch: ImageBatch, upstream: dict[str, list[TeacherOutput]]) -> Pending:
        """Queue the batch's device work; the returned :class:`Pending` finishes on the host."""
        return Pending.ready(self.predict(batch, upstream))

    def torch_modules(self) -> list[torch.nn.Module]:
        """The networks ``channels_last``/``compile`` apply to: by default the module attributes."""
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def apply_gpu_options(self) -> None:
        """Apply the config's ``channels_last`` and ``compile`` to :meth:`torch_modules`."""
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
# Registry
# --------------------------------------------------------------------------

_BUILTIN = {
    "maskclip": "labelmill.teachers.maskclip:MaskCLIPTeacher",
    "glip": "labelmill.teachers.glip:GLIPTeacher",
    "vild": "labelmill.teachers.vild:ViLDEmbedder",
    "null": "labelmill.teachers.null:NullTeacher",
    "student": "labelmill.teachers.student:StudentTeacher",
}


def resolve_teacher_class(type_name: str) -> type[Teacher]:
    """Find the class for ``type`` in a config: built-in, entry point or class path."""
    target = _BUILTIN.get(type_name)
    if target is None:
        for ep in entry_points(group="labelmill.teachers"):
            if ep.name == type_name:
                cls = ep.load()
                break
        else:
            if ":" not in type_name:
                known = sorted(_BUILTIN)
                raise ValueError(
                    f"unknown teacher type {type_name!r}: use one of {known}, an entry point of "
                    "group 'labelmill.teachers', or a class path 'package.module:ClassName'"
                )
            target = type_name
            cls = None
    else:
        cls = None
    if cls is None:
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"teacher {type_name!r}: cannot import module {module_name!r}: {exc}") from exc
        try:
            cls = getattr(module, attr)
        except AttributeError:
            raise ValueError(f"teacher {type_name!r}: module {module_name!r} has no {attr!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"teacher {type_name!r} resolves to {cls!r}, which is not a labelmill Teacher")
    return cls


def validate_teacher_config(section: dict[str, Any]) -> TeacherConfig:
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError("each teacher needs a 'type'")
    cls = resolve_teacher_class(section["type"])
    return cls.Config.model_validate(section)


def build_teacher(config: TeacherConfig, device: torch.device, allow_random_init: bool = False) -> Teacher:
    cls = resolve_teacher_class(config.type)
    return cls(config, device, allow_random_init=allow_random_init)


def boxes_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, 2:] -= out[:, :2]
    return out
