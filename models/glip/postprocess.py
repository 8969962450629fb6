"""ATSS post-processing of GLIP's per-token predictions for one image.

For every pyramid level:

1. token probabilities ``sigmoid(logits)`` are averaged over each phrase's
   tokens (the normalised positive map), giving per-location phrase scores;
2. locations/phrases scoring above ``pre_nms_thresh`` are candidates; at most
   ``pre_nms_top_n`` of them are kept, ranked by score x sigmoid(centerness);
3. the survivors' anchors are decoded with the ATSS box coder and their
   final score is ``sqrt(score * centerness)``;
4. boxes are clipped to the resized (unpadded) image.

Then, over all levels: non-maximum suppression at ``nms_thresh`` separately
per phrase, and at most ``max_detections`` boxes are kept (by score; ties at
the cut-off are all kept, as in the reference).  Boxes use the inclusive
(+1) pixel convention of maskrcnn-benchmark, also for NMS overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from .anchors import decode_boxes


@dataclass
class RawDetections:
    """Detections in resized-image pixels, sorted by descending score."""

    boxes: torch.Tensor  # (N, 4) xyxy
    scores: torch.Tensor  # (N,)
    phrase_indices: torch.Tensor  # (N,) int64


def phrase_scores(token_logits: torch.Tensor, positive_map: torch.Tensor) -> torch.Tensor:
    """(N, L) token logits x normalised (P, L) map -> (N, P) mean token probability."""
    length = token_logits.shape[-1]
    pmap = positive_map.to(token_logits.device, torch.float32)
    if pmap.shape[1] < length:
        pmap = torch.nn.functional.pad(pmap, (0, length - pmap.shape[1]))
    elif pmap.shape[1] > length:
        if pmap[:, length:].any():
            raise ValueError("positive map refers to tokens beyond the logits")
        pmap = pmap[:, :length]
    return token_logits.float().sigmoid() @ pmap.t()


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def nms_per_phrase(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, thresh: float) -> torch.Tensor:
    """Indices kept by class-aware NMS, in descending score order (+1 box extents)."""
    inclusive = boxes.clone()
    inclusive[:, 2:] += 1
    return batched_nms(inclusive, scores, labels, thresh)


def keep_top(scores: torch.Tensor, limit: int) -> torch.Tensor:
    """Mask of the ``limit`` best scores, keeping everything tied with the last one."""
    n = scores.numel()
    if limit <= 0 or n <= limit:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = torch.kthvalue(scores.float().cpu(), n - limit + 1).values.item()
    return scores >= kth


def select_detections(
    box_deltas: list[torch.Tensor],
    centerness: list[torch.Tensor],
    token_logits: list[torch.Tensor],
    anchors: list[torch.Tensor],
    positive_map: torch.Tensor,
    image_size: tuple[int, int],
    *,
    pre_nms_thresh: float,
    pre_nms_top_n: int,
    nms_thresh: float,
    max_detections: int,
) -> RawDetections:
    """Detections for one image.

    Per level ``l``: ``box_deltas[l]`` (4, H, W), ``centerness[l]`` (1, H, W),
    ``token_logits[l]`` (H*W, L), ``anchors[l]`` (H*W, 4).  ``positive_map``
    is the normalised (P, L') phrase-to-token map; ``image_size`` is the
    resized, unpadded (h, w).
    """
    height, width = image_size
    all_boxes, all_scores, all_labels = [], [], []
    for deltas, ctr, logits, level_anchors in zip(box_deltas, centerness, token_logits, anchors):
        deltas = deltas.float().reshape(4, -1).t()  # (H*W, 4)
        ctr = ctr.float().reshape(-1).sigmoid()
        scores = phrase_scores(logits, positive_map)  # (H*W, P)
        candidates = scores > pre_nms_thresh
        ranked = (scores * ctr[:, None])[candidates]
        k = min(int(candidates.sum()), pre_nms_top_n)
        ranked, order = ranked.topk(k, sorted=False)
        loc, label = candidates.nonzero().unbind(1)
        loc, label = loc[order], label[order]
        boxes = clip_boxes(decode_boxes(deltas[loc], level_anchors[loc]), height, width)
        keep = (boxes[:, 2] - boxes[:, 0] + 1 >= 0) & (boxes[:, 3] - boxes[:, 1] + 1 >= 0)
        all_boxes.append(boxes[keep])
        all_scores.append(ranked[keep].sqrt())
        all_labels.append(label[keep])
    boxes = torch.cat(all_boxes)
    scores = torch.cat(all_scores)
    labels = torch.cat(all_labels)
    kept = nms_per_phrase(boxes, scores, labels, nms_thresh)
    boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
    top = keep_top(scores, max_detections)
    return RawDetections(boxes[top], scores[top], labels[top])
