"""Training targets built from stored label rows.

* segmentation: a per-pixel class map from the MaskCLIP masks (COCO RLE);
  pixels of masks under the load-time threshold, and unlabelled pixels, get
  ``IGNORE``;
* grounding: caption, boxes (xyxy, pixels) and ``tokens_positive`` per box,
  keeping only boxes at or above the threshold; an image with none left is
  skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

#: pixels without a target; -1 can never be a class id, so a vocabulary of any size trains every class
IGNORE = -1


def mark_gold(class_ids):
    """Ground-truth pixels travel as ``-2 - class`` (pseudo-labels as ``class``, none as ``IGNORE``), so one
    integer map carries both through augmentation; :func:`split_gold` reads it back.  Works on numpy
    arrays and torch tensors alike."""
    return -2 - class_ids


def split_gold(target):
    """(class ids, is_gold) of a target map made with :func:`mark_gold` (IGNORE stays IGNORE, not gold)."""
    gold = target <= -2
    return (gold * (-2 - target) + ~gold * target), gold


def class_map(masks: Sequence[dict[str, Any]], height: int, width: int, threshold: float = 0.0,
              classes: dict[int, int] | None = None) -> np.ndarray:
    """(H, W) int64 class ids; ``IGNORE`` where no mask at the threshold covers a pixel.

    ``masks``: dicts with ``class_id``, ``score`` and ``segmentation``
    ({size, counts}).  ``classes`` optionally maps stored class ids to the
    student's ids (a stored id missing from it is ignored).  Higher-scored
    masks win where masks overlap.
    """
    out = np.full((height, width), IGNORE, np.int64)
    for m in sorted(masks, key=lambda m: m["score"] or 0.0):
        if m.get("segmentation") is None or (m["score"] or 0.0) < threshold:
            continue
        cid = m["class_id"] if classes is None else classes.get(m["class_id"])
        if cid is None:
            continue
        seg = m["segmentation"]
        rle = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"].encode()}
        if tuple(rle["size"]) != (height, width):
            raise ValueError(f"mask size {rle['size']} differs from the image's {(height, width)}")
        out[mask_utils.decode(rle).astype(bool)] = cid
    return out


@dataclass
class GroundingTarget:
    caption: str
    boxes: np.ndarray                       # (N, 4) xyxy pixels, float32
    tokens_positive: list[list[list[int]]]  # per box: character spans into caption
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    from_caption: bool = False              # the rows' own caption (caption mode), not a rebuilt class list

    def __len__(self) -> int:
        return len(self.boxes)


def grounding_target(rows: Sequence[dict[str, Any]], threshold: float = 0.0, negatives: Sequence[str] = (),
                     max_classes: int = 85, rng: np.random.Generator | None = None) -> GroundingTarget | None:
    """Caption + boxes + spans from GLIP label rows; ``None`` when no box reaches ``threshold``.

    Rows of a ``caption``-mode teacher carry ``caption`` and
    ``tokens_positive``; rows of a ``vocabulary``-mode teacher carry only a
    class name, so their caption is rebuilt as ``"a. b. "`` with one span
    per class, plus classes from ``negatives`` (the teacher's vocabulary)
    that have no box in the image, up to ``max_classes`` names in all (GLIP's
    detection prompts: the student learns to find no box for a name), in an
    order ``rng`` shuffles.
    """
    kept = [r for r in rows if r.get("bbox") is not None and (r.get("score") or 0.0) >= threshold]
    if not kept:
        return None
    from_caption = all(r.get("caption") and r.get("tokens_positive") for r in kept)
    if from_caption:
        caption = kept[0]["caption"]
        spans = [[[int(a), int(b)] for a, b in r["tokens_positive"]] for r in kept]
    else:
        names = sorted({r.get("phrase") or r.get("class_name") for r in kept})
        absent = [n for n in dict.fromkeys(negatives) if n not in names]
        room = max(0, max_classes - len(names))
        if rng is not None and len(absent) > room:
            absent = [absent[i] for i in sorted(rng.choice(len(absent), room, replace=False))]
        names = names + absent[:room]
        if rng is not None:
            names = [names[i] for i in rng.permutation(len(names))]
        caption, where = "", {}
        for name in names:
            where[name] = [len(caption), len(caption) + len(name)]
            caption += name + ". "
        spans = [[where[r.get("phrase") or r.get("class_name")]] for r in kept]
    boxes = np.asarray([r["bbox"] for r in kept], np.float32).reshape(-1, 4)
    # stored xywh -> xyxy with GLIP's inclusive pixel corners: the teacher stores w = x2 - x1 + 1, so
    # x2 = x + w - 1 gives its box back exactly (x + w would widen every box by 1 px per self-training round)
    boxes[:, 2:] = np.maximum(boxes[:, :2] + boxes[:, 2:] - 1, boxes[:, :2])
    scores = np.asarray([r.get("score") or 0.0 for r in kept], np.float32)
    return GroundingTarget(caption, boxes, spans, scores, from_caption)


def pack_caption(caption: str, spans: list[list[list[int]]], negatives: Sequence[str], room: int,
                 length, rng: np.random.Generator) -> tuple[str, list[list[list[int]]]]:
    """GLIP's caption packing: other captions joined to the positive one as negatives, in shuffled order.

    Negatives are taken in random order while their token counts (``length(text)``, special tokens
    included, as GLIP counts them) fit in ``room`` minus the positive caption's own, so the positive
    caption is never truncated.  Each caption ends with ``"."`` and a space; the spans move with the
    positive caption.  Returns the packed caption and the shifted spans."""
    if not negatives:
        return caption, spans
    budget = room - length(caption)
    chosen = []
    for i in rng.permutation(len(negatives)):
        n = length(negatives[i])
        if n < budget:
            chosen.append(negatives[i])
            budget -= n
    parts = [caption] + chosen
    order = rng.permutation(len(parts))
    packed, start = "", 0
    for i in order:
        if i == 0:
            start = len(packed)
        packed += parts[i] + ("" if parts[i].endswith(".") else ".") + " "
    return packed, [[[a + start, b + start] for a, b in box] for box in spans]
