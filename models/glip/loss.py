"""GLIP training losses: ATSS assignment, token alignment (sigmoid focal), GIoU, centerness.

For each image, anchors of every level are matched to its ground-truth
boxes by ATSS with GLIP's conventions: per level the ``topk`` anchors whose
centres lie closest to a box's centre are candidates; those with IoU (pixel
areas counted inclusively, ``x2 - x1 + 1``) at least the candidates' mean +
std, and whose centre lies more than 0.01 px inside the box, are positives
(an anchor claimed by several boxes takes the one it overlaps most).

Every term is pooled over the whole batch, and over all training workers,
as GLIP's ``ATSSLossComputation`` does:

* alignment: sigmoid focal loss of the (anchor, token) logits against the
  token map of each positive anchor's box (the tokens its phrase spans;
  negatives want every token off, or only the final one when prompts fill
  max_query_len, as GLIP's; padded tokens masked), summed over the
  batch, / the mean number of positives per worker;
* box: GIoU of the positives' decoded boxes against their boxes, weighted
  by the centerness targets, summed, / the mean centerness-target sum per worker;
* centerness: BCE (summed) of the centerness logit against
  ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``, / the mean number of positives per worker.

The positive count and the centerness-target sum are all-reduced across
workers when ``torch.distributed`` is initialised (Ray Train's workers), so
data-parallel training (gradients averaged over workers) trains on exactly
the loss of the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

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


#: an anchor's centre must lie more than this far (px) inside a box to be its positive (GLIP's ATSS)
INSIDE_MARGIN = 0.01


def box_iou_inclusive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of xyxy boxes whose corners are pixel indices: widths and overlaps count ``x2 - x1 + 1``."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None] - inter)


def atss_assign(anchors: list[torch.Tensor], boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Index of the matched box per anchor (all levels concatenated), -1 for negatives."""
    all_anchors = torch.cat(anchors)
    n = all_anchors.shape[0]
    if boxes.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long, device=all_anchors.device)
    ious = box_iou_inclusive(all_anchors, boxes)  # (N, G)
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
    ltrb = torch.stack([cx - boxes[None, :, 0], cy - boxes[None, :, 1], boxes[None, :, 2] - cx,
                        boxes[None, :, 3] - cy], -1)
    is_pos &= ltrb.min(-1).values > INSIDE_MARGIN
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


def _worker_mean(value: torch.Tensor) -> float:
    """``value`` summed over all training workers / their number (itself without ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    total = value.detach().to(torch.float64).reshape(1).clone()
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def glip_loss(out: GLIPOutput, targets: list[GroundingTargets], attention_mask: torch.Tensor,
              weights: LossWeights | None = None, max_query_len: int | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms for a batch, pooled over the batch and the workers (see the module doc).

    ``max_query_len``: when the batch's prompts fill all of it, background anchors want the final token on
    (GLIP's "no object" target at position 256); shorter prompts leave that position masked, as in GLIP,
    where the final position is padding then."""
    w = weights or LossWeights()
    b = attention_mask.shape[0]
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(b, -1, 4) for d in out.box_deltas], 1).float()
    centerness = torch.cat([c.reshape(b, -1) for c in out.centerness], 1).float()
    logits = torch.cat(out.token_logits, 1).float()  # (B, N, L)
    anchors = torch.cat(out.anchors).to(deltas.device)
    token_ok = attention_mask.bool()
    cls_sum = logits.sum() * 0.0
    pred_boxes, gt_boxes, ctr_targets, ctr_logits = [], [], [], []
    for i, tgt in enumerate(targets):
        match = atss_assign([a.to(deltas.device) for a in out.anchors], tgt.boxes.to(deltas.device), w.topk)
        pos = match >= 0
        want = torch.zeros_like(logits[i])
        if max_query_len is not None and want.shape[1] == max_query_len:
            want[~pos, -1] = 1.0  # masked below wherever this prompt does not reach the last token
        if pos.any():
            want[pos] = tgt.token_map.to(want)[match[pos], : want.shape[1]]
            gt = tgt.boxes.to(deltas.device)[match[pos]]
            gt_boxes.append(gt)
            ctr_targets.append(centerness_target(anchors[pos], gt))
            pred_boxes.append(decode_boxes(deltas[i][pos], anchors[pos]))
            ctr_logits.append(centerness[i][pos])
        valid = token_ok[i][None].expand_as(want)
        cls_sum = cls_sum + sigmoid_focal_loss(logits[i][valid], want[valid], alpha=w.alpha, gamma=w.gamma,
                                               reduction="sum")
    n_pos = sum(len(g) for g in gt_boxes)
    # the two all-reduces run on every worker in the same order, whatever it holds (no deadlock)
    pos_per_worker = max(_worker_mean(torch.tensor(float(n_pos))), 1.0)
    ctr_t = torch.cat(ctr_targets) if ctr_targets else centerness.new_zeros(0)
    ctr_per_worker = _worker_mean(ctr_t.sum())
    loss_cls = cls_sum / pos_per_worker
    if n_pos:
        giou = generalized_box_iou_loss(torch.cat(pred_boxes), torch.cat(gt_boxes), reduction="none")
        loss_box = (giou * ctr_t).sum() / max(ctr_per_worker, 1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(torch.cat(ctr_logits), ctr_t, reduction="sum") / pos_per_worker
    else:
        loss_box = loss_ctr = deltas.sum() * 0.0 + centerness.sum() * 0.0
    total = loss_cls + w.box * loss_box + w.centerness * loss_ctr
    return total, {"loss_align": float(loss_cls.detach()), "loss_giou": float(loss_box.detach()),
                   "loss_centerness": float(loss_ctr.detach()), "positives": float(n_pos)}
