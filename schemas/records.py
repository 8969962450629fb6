"""Record types that move between labelmill's stages.

Teachers return these plain dataclasses; :mod:`labelmill.schemas.tables`
turns them into Arrow rows.  Nothing here imports torch or Ray, so the
records can be built and inspected anywhere (tests, notebooks, writers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


class SampleStatus(str, Enum):
    """Outcome of one input sample.  Every sample read ends in exactly one."""

    LABELLED = "labelled"
    NO_LABELS = "no_labels"
    ERROR = "error"


@dataclass(frozen=True)
class Provenance:
    """Which teacher, weights and configuration produced a label."""

    teacher: str            # instance name in the run config, e.g. "maskclip"
    teacher_type: str       # plug-in type, e.g. "maskclip" or "pkg.mod:Class"
    weights: str            # human readable weights id, e.g. "ViT-B-16@openai"
    weights_sha256: str     # sha256 of the weight file, or "random-init"
    teacher_config_hash: str

    @property
    def is_random(self) -> bool:
        return self.weights_sha256 == "random-init"


@dataclass
class Label:
    """One pseudo-label: a mask (with its box) or a box.

    Coordinates are always in pixels of the original image, after EXIF
    rotation.  ``bbox`` is COCO style ``[x, y, width, height]``.
    """

    kind: str                               # "mask" | "box"
    score: float
    bbox: tuple[float, float, float, float]
    class_name: str
    class_id: int | None = None             # index in the teacher's vocabulary
    area: float | None = None               # mask pixels, or box area
    rle: dict[str, Any] | None = None       # COCO RLE {"size": [h, w], "counts": str}
    phrase: str | None = None               # grounded phrase (GLIP)
    tokens_positive: list[tuple[int, int]] | None = None  # character spans in the caption
    caption: str | None = None              # the prompt the phrase spans index
    iscrowd: bool = False                   # a crowd region (COCO iscrowd=1): not one instance

    def __post_init__(self) -> None:
        if self.kind not in ("mask", "box"):
            raise ValueError(f"label kind must be 'mask' or 'box', got {self.kind!r}")
        if self.kind == "mask" and self.rle is None:
            raise ValueError("a mask label needs its RLE")
        if self.area is None:
            self.area = float(self.bbox[2] * self.bbox[3])


@dataclass
class RegionSet:
    """Region embeddings of one image (ViLD distillation targets)."""

    boxes: np.ndarray          # (N, 4) float32, xyxy in original pixels
    scores: np.ndarray         # (N,) float32
    sources: list[str]         # which teacher / field proposed each box
    embeddings: np.ndarray     # (N, D) float16, L2-normalised
    mode: str                  # "crop" | "dense"
    model: str = ""            # the encoder that made the embeddings, e.g. "ViT-B-16"
    pixel_scale: float = 1.0   # pixels the encoder saw per original pixel (1.0: the original resolution)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or len(self.scores) != n or len(self.sources) != n:
            raise ValueError("boxes, scores and sources must have one entry per region")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise ValueError("embeddings must be (num_regions, dim)")


@dataclass
class TeacherOutput:
    """Everything one teacher produced for one image."""

    labels: list[Label] = field(default_factory=list)
    regions: RegionSet | None = None
    warnings: list[str] = field(default_factory=list)
    # Dense features a later teacher in the same run may reuse (e.g. the ViLD
    # embedder pooling MaskCLIP's value-path features).  Never written out.
    extras: dict[str, Any] = field(default_factory=dict)

    def proposal_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) xyxy in original pixels and scores (N,) of the labels, for a later teacher."""
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (lab.bbox for lab in self.labels)],
                         dtype=np.float64).reshape(-1, 4)
        return boxes, np.array([float(lab.score) for lab in self.labels], dtype=np.float64)


@dataclass(frozen=True)
class ImageRequest:
    """The working resolution a teacher wants from the decoder.

    The decoder resizes every image (keeping its aspect ratio) so that its
    short side is at most ``short_side`` and its long side at most
    ``max_long_side``; it never enlarges.  With several teachers the decoder
    serves the largest request and each teacher resizes on the tensor side.
    """

    short_side: int
    max_long_side: int

    def scale_for(self, height: int, width: int) -> float:
        short, long = min(height, width), max(height, width)
        return min(self.short_side / short, self.max_long_side / long)
