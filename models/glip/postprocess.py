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

:func:`select_detections` is the readable one-image reference.  The
predictor uses :func:`select_batch`, which does the same for every
(image, prompt) job of a forward batch at once, on the device the head ran
on (phrase scores, thresholds, top-k, box decoding, NMS); tests hold the two
equal.  :func:`merge_and_pack` then merges prompt chunks per image, rescales
to original pixels, applies the score floor and cap, and packs the whole
batch into one tensor so that it crosses to the host in one copy.
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
    kth = scores.float().topk(limit).values[-1]  # the limit-th best, on the scores' device
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


def select_batch(
    box_deltas: list[torch.Tensor],
    centerness: list[torch.Tensor],
    token_logits: list[torch.Tensor],
    anchors: list[torch.Tensor],
    positive_maps: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    *,
    pre_nms_thresh: float,
    pre_nms_top_n: int,
    nms_thresh: float,
    max_detections: int,
) -> list[RawDetections]:
    """:func:`select_detections` for B jobs at once, on the tensors' device.

    Per level: ``box_deltas[l]`` (B, 4, H, W), ``centerness[l]`` (B, 1, H, W),
    ``token_logits[l]`` (B, H*W, L), ``anchors[l]`` (H*W, 4).  Job ``b`` has
    the normalised phrase map ``positive_maps[b]`` (P_b, L') and the resized
    image size ``image_sizes[b]``.  Phrase maps are zero-padded to the
    longest; a padded phrase scores 0, never above a threshold >= 0.
    """
    batch = token_logits[0].shape[0]
    device = token_logits[0].device
    n_phr = max(int(m.shape[0]) for m in positive_maps)
    n_tok = max(int(m.shape[1]) for m in positive_maps)
    pmaps = torch.zeros((batch, n_phr, n_tok), dtype=torch.float32, device=device)
    for b, m in enumerate(positive_maps):
        pmaps[b, : m.shape[0], : m.shape[1]] = m.to(device, torch.float32)
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)  # (B, 2) h, w
    max_x = (sizes[:, 1] - 1)[:, None]
    max_y = (sizes[:, 0] - 1)[:, None]
    all_boxes, all_scores, all_labels, all_jobs = [], [], [], []
    for deltas, ctr, logits, level_anchors in zip(box_deltas, centerness, token_logits, anchors):
        hw = logits.shape[1]
        length = logits.shape[-1]
        pmap = pmaps
        if n_tok < length:
            pmap = torch.nn.functional.pad(pmaps, (0, length - n_tok))
        elif n_tok > length:
            if pmaps[:, :, length:].any():
                raise ValueError("positive map refers to tokens beyond the logits")
            pmap = pmaps[:, :, :length]
        scores = logits.float().sigmoid() @ pmap.transpose(1, 2)  # (B, HW, P)
        ctr = ctr.float().reshape(batch, hw).sigmoid()
        candidates = scores > pre_nms_thresh
        ranked = torch.where(candidates, scores * ctr[:, :, None], torch.full_like(scores, -1.0)).reshape(batch, -1)
        k = min(pre_nms_top_n, ranked.shape[1])
        top, flat = ranked.topk(k, dim=1, sorted=False)  # (B, k)
        valid = candidates.reshape(batch, -1).gather(1, flat)
        job = torch.arange(batch, device=device)[:, None].expand(batch, k)
        loc, label = flat // n_phr, flat % n_phr
        deltas = deltas.float().reshape(batch, 4, hw).transpose(1, 2)  # (B, HW, 4)
        picked = deltas.gather(1, loc[:, :, None].expand(batch, k, 4))
        boxes = decode_boxes(picked.reshape(-1, 4), level_anchors[loc.reshape(-1)]).reshape(batch, k, 4)
        x = torch.minimum(boxes[:, :, 0::2].clamp(min=0), max_x[:, :, None])
        y = torch.minimum(boxes[:, :, 1::2].clamp(min=0), max_y[:, :, None])
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=2)
        valid &= (boxes[..., 2] - boxes[..., 0] + 1 >= 0) & (boxes[..., 3] - boxes[..., 1] + 1 >= 0)
        all_boxes.append(boxes[valid])
        all_scores.append(top[valid].sqrt())
        all_labels.append(label[valid])
        all_jobs.append(job[valid])
    boxes = torch.cat(all_boxes)
    scores = torch.cat(all_scores)
    labels = torch.cat(all_labels)
    jobs = torch.cat(all_jobs)
    # NMS and the cap per job (as the reference does, so that NMS's per-class
    # coordinate offsets stay those of one image); one host sync for the counts
    order = torch.argsort(jobs, stable=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    counts = torch.bincount(jobs, minlength=batch).tolist()
    out = []
    for b_boxes, b_scores, b_labels in zip(boxes.split(counts), scores.split(counts), labels.split(counts)):
        kept = nms_per_phrase(b_boxes, b_scores, b_labels, nms_thresh)
        b_boxes, b_scores, b_labels = b_boxes[kept], b_scores[kept], b_labels[kept]
        top = keep_top(b_scores, max_detections)
        out.append(RawDetections(b_boxes[top], b_scores[top], b_labels[top]))
    return out


def merge_and_pack(
    parts: list[list[RawDetections]],
    phrase_offsets: list[list[int]],
    scales: list[tuple[float, float]],
    *,
    score_floor: float,
    max_detections: int | None,
) -> tuple[torch.Tensor, list[int]]:
    """Merge each image's prompt chunks and pack the batch for one host copy.

    ``parts[i][j]`` are image ``i``'s detections for prompt chunk ``j``,
    whose phrase indices are shifted by ``phrase_offsets[i][j]``; boxes are
    multiplied by ``scales[i]`` = (sx, sy).  Per image, boxes scoring below
    ``score_floor`` go, the rest are sorted by descending score (stable) and
    cut to ``max_detections``.  Returns an (N, 6) float64 tensor on the
    parts' device -- x1, y1, x2, y2, score, phrase index -- and the row
    count of each image.
    """
    rows, counts = [], []
    for image_parts, offsets, (sx, sy) in zip(parts, phrase_offsets, scales):
        boxes = torch.cat([r.boxes.float() for r in image_parts])
        scores = torch.cat([r.scores.float() for r in image_parts])
        labels = torch.cat([r.phrase_indices + int(off) for r, off in zip(image_parts, offsets)])
        boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=boxes.device)
        keep = scores >= score_floor
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        if max_detections is not None:
            order = order[:max_detections]
        rows.append(
            torch.cat([boxes[order].double(), scores[order].double()[:, None], labels[order].double()[:, None]], 1)
        )
        counts.append(int(order.numel()))
    return torch.cat(rows), counts
