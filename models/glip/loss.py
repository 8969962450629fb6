"""GLIP training losses: ATSS assignment, token alignment (sigmoid focal), GIoU, centerness.

For each image, anchors of every level are matched to its ground-truth
boxes by ATSS: per level the ``topk`` anchors whose centres lie closest to
a box's centre are candidates; those with IoU at least the candidates'
mean + std, and whose centre lies inside the box, are positives (an anchor
claimed by several boxes takes the one it overlaps most).

* alignment: the (anchor, token) logits are trained with sigmoid focal loss
  against the token map of each positive anchor's box (the tokens its
  phrase spans); negatives want every token off.  Padded tokens are masked.
  Normalised by the number of positives.
* box: GIoU between the decoded boxes of positives and their boxes,
  weighted by the centerness targets (ATSS).
* centerness: BCE of the centerness logit against
  ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .anchors import decode_boxes
from .model import GLIPOutput


@dataclass
class GroundingTargets:
    """One image's targets: boxes (G, 4) xyxy in padded-image pixels, token map (G, L) binary."""

    boxes: torch.Tensor
    token_map: torch.Tensor


@dataclass
class LossWeights:
    topk: int = 9
    alpha: float = 0.25
    gamma: float = 2.0
    box: float = 2.0
    centerness: float = 1.0


def atss_assign(anchors: list[torch.Tensor], boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Index of the matched box per anchor (all levels concatenated), -1 for negatives."""
    all_anchors = torch.cat(anchors)
    n = all_anchors.shape[0]
    if boxes.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long, device=all_anchors.device)
    ious = box_iou(all_anchors, boxes)  # (N, G)
    a_ctr = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    b_ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, b_ctr)  # (N, G)
    candidates = []
    start = 0
    for level in anchors:
        end = start + level.shape[0]
        k = min(topk, level.shape[0])
        candidates.append(dist[start:end].topk(k, dim=0, largest=False).indices + start)
        start = end
    cand = torch.cat(candidates)  # (K, G)
    cand_iou = ious.gather(0, cand)
    thresh = cand_iou.mean(0) + cand_iou.std(0, unbiased=cand.shape[0] > 1 and True)
    is_pos = cand_iou >= thresh[None]
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # (K, G)
    inside = (cx > boxes[None, :, 0]) & (cx < boxes[None, :, 2]) & (cy > boxes[None, :, 1]) & (cy < boxes[None, :, 3])
    is_pos &= inside
    masked = torch.full_like(ious, -1.0)
    g_idx = torch.arange(boxes.shape[0], device=boxes.device)[None].expand_as(cand)
    masked[cand[is_pos], g_idx[is_pos]] = ious[cand[is_pos], g_idx[is_pos]]
    best, arg = masked.max(1)
    return torch.where(best > -1, arg, torch.full_like(arg, -1))


def centerness_target(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    l, t = ctr[:, 0] - boxes[:, 0], ctr[:, 1] - boxes[:, 1]
    r, b = boxes[:, 2] - ctr[:, 0], boxes[:, 3] - ctr[:, 1]
    lr = torch.stack([l, r], 1).clamp_min(1e-6)
    tb = torch.stack([t, b], 1).clamp_min(1e-6)
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def glip_loss(out: GLIPOutput, targets: list[GroundingTargets], attention_mask: torch.Tensor,
              weights: LossWeights | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms for a batch."""
    w = weights or LossWeights()
    b = attention_mask.shape[0]
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(b, -1, 4) for d in out.box_deltas], 1).float()
    centerness = torch.cat([c.reshape(b, -1) for c in out.centerness], 1).float()
    logits = torch.cat(out.token_logits, 1).float()  # (B, N, L)
    anchors = torch.cat(out.anchors).to(deltas.device)
    token_ok = attention_mask.bool()
    cls_terms, box_terms, ctr_terms = [], [], []
    n_pos_total = 0
    for i, tgt in enumerate(targets):
        match = atss_assign([a.to(deltas.device) for a in out.anchors], tgt.boxes.to(deltas.device), w.topk)
        pos = match >= 0
        n_pos = int(pos.sum())
        n_pos_total += n_pos
        want = torch.zeros_like(logits[i])
        if n_pos:
            want[pos] = tgt.token_map.to(want)[match[pos], : want.shape[1]]
        valid = token_ok[i][None].expand_as(want)
        cls_terms.append(sigmoid_focal_loss(logits[i][valid], want[valid], alpha=w.alpha, gamma=w.gamma,
                                            reduction="sum"))
        if n_pos:
            gt = tgt.boxes.to(deltas.device)[match[pos]]
            ctr_t = centerness_target(anchors[pos], gt)
            pred = decode_boxes(deltas[i][pos], anchors[pos])
            box_terms.append((generalized_box_iou_loss(pred, gt, reduction="none") * ctr_t).sum() / ctr_t.sum().clamp_min(1e-6))
            ctr_terms.append(F.binary_cross_entropy_with_logits(centerness[i][pos], ctr_t, reduction="mean"))
    norm = max(n_pos_total, 1)
    loss_cls = torch.stack(cls_terms).sum() / norm
    zero = logits.sum() * 0.0
    loss_box = torch.stack(box_terms).mean() if box_terms else zero
    loss_ctr = torch.stack(ctr_terms).mean() if ctr_terms else zero
    total = loss_cls + w.box * loss_box + w.centerness * loss_ctr
    return total, {"loss_align": float(loss_cls.detach()), "loss_giou": float(loss_box.detach()),
                   "loss_centerness": float(loss_ctr.detach()), "positives": float(n_pos_total)}
