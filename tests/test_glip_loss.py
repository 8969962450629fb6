"""The GLIP student's loss as GLIP's trainer pools it: over the batch, over workers; ATSS conventions; boxes that
round-trip from teacher to training target without drift."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


def _batch(seed: int = 0):
    """A tiny GLIP, two images: one box on the first, five on the second (a busy image)."""
    from labelmill.models.glip import GLIP, GLIPConfig
    from labelmill.models.glip.loss import GroundingTargets

    torch.manual_seed(seed)
    model = GLIP(GLIPConfig.tiny()).eval()  # eval: the forward of one image equals its row of a batch's
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(5, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0  # a padded prompt
    one = torch.tensor([[10.0, 8.0, 60.0, 50.0]])
    busy = torch.tensor([[2.0, 2.0, 30.0, 20.0], [40.0, 5.0, 90.0, 40.0], [5.0, 30.0, 45.0, 62.0],
                         [50.0, 35.0, 80.0, 60.0], [20.0, 10.0, 70.0, 55.0]])
    maps = []
    for n in (1, 5):
        m = torch.zeros(n, 8)
        for g in range(n):
            m[g, 1 + g % 5] = 1
        maps.append(m)
    targets = [GroundingTargets(one, maps[0]), GroundingTargets(busy, maps[1])]
    return model, images, ids, mask, targets


def pooled_reference(out, targets, mask, weights, final_token: bool = False) -> torch.Tensor:
    """The pooled rule written out: every term summed over the batch, then divided once by the batch's
    positive count (alignment, centerness) or centerness-target sum (box).  ``final_token``: background
    anchors want the last token on (GLIP's rule for prompts that fill max_query_len)."""
    from labelmill.models.glip.anchors import decode_boxes
    from labelmill.models.glip.loss import atss_assign, centerness_target

    b = mask.shape[0]
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(b, -1, 4) for d in out.box_deltas], 1)
    ctr_logit = torch.cat([c.reshape(b, -1) for c in out.centerness], 1)
    logits = torch.cat(out.token_logits, 1)
    anchors = torch.cat(out.anchors)
    focal = giou_weighted = bce = ctr_sum = 0.0
    n_pos = 0
    for i, t in enumerate(targets):
        match = atss_assign(out.anchors, t.boxes, weights.topk)
        pos = match >= 0
        want = torch.zeros_like(logits[i])
        want[pos] = t.token_map[match[pos], : want.shape[1]]
        if final_token:
            want[~pos, -1] = 1.0
        valid = mask[i].bool()[None].expand_as(want)
        focal = focal + sigmoid_focal_loss(logits[i][valid], want[valid], alpha=weights.alpha, gamma=weights.gamma,
                                           reduction="sum")
        gt = t.boxes[match[pos]]
        ct = centerness_target(anchors[pos], gt)
        giou_weighted = giou_weighted + (generalized_box_iou_loss(decode_boxes(deltas[i][pos], anchors[pos]), gt,
                                                                  reduction="none") * ct).sum()
        bce = bce + F.binary_cross_entropy_with_logits(ctr_logit[i][pos], ct, reduction="sum")
        ctr_sum = ctr_sum + ct.sum()
        n_pos += int(pos.sum())
    return focal / n_pos + weights.box * giou_weighted / ctr_sum + weights.centerness * bce / n_pos


def test_loss_pools_every_term_over_the_batch():
    from labelmill.models.glip.loss import LossWeights, glip_loss

    model, images, ids, mask, targets = _batch()
    out = model(images, ids, mask)
    loss, terms = glip_loss(out, targets, mask)
    want = pooled_reference(out, targets, mask, LossWeights())
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # per-image averaging (the rule before) gives another loss: the test tells them apart
    single = [glip_loss(model(images[i : i + 1], ids[i : i + 1], mask[i : i + 1]), [targets[i]], mask[i : i + 1])[0]
              for i in range(2)]
    assert abs(float(sum(single)) / 2 - float(loss)) > 1e-3 * float(loss)


def test_background_anchors_want_the_final_token_when_prompts_fill_max_query_len():
    """GLIP's rule: a background anchor's target is the final token of the 256 (padding, masked, unless the
    prompt fills all of them).  The batch's second prompt reaches the last of its 8 positions; the first is
    padded there, so only the second image's background changes."""
    from labelmill.models.glip.loss import LossWeights, glip_loss

    model, images, ids, mask, targets = _batch()
    out = model(images, ids, mask)
    full, _ = glip_loss(out, targets, mask, max_query_len=8)
    want = pooled_reference(out, targets, mask, LossWeights(), final_token=True)
    assert float(full.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    shorter, _ = glip_loss(out, targets, mask, max_query_len=256)  # prompts shorter than the limit: no such target
    assert float(shorter.detach()) == pytest.approx(float(glip_loss(out, targets, mask)[0].detach()), rel=1e-6)
    assert abs(float(full) - float(shorter)) > 1e-3 * float(shorter)
    # the first prompt alone (padded at the final position) is unchanged by the rule
    one = model(images[:1], ids[:1], mask[:1])
    assert float(glip_loss(one, targets[:1], mask[:1], max_query_len=8)[0]) == pytest.approx(
        float(glip_loss(one, targets[:1], mask[:1])[0]), rel=1e-6)


def _worker(rank: int, world: int, init: str, result_dir: str) -> None:
    import torch.distributed as dist

    from labelmill.models.glip.loss import glip_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, images, ids, mask, targets = _batch()
        out = model(images[rank : rank + 1], ids[rank : rank + 1], mask[rank : rank + 1])
        loss, _ = glip_loss(out, [targets[rank]], mask[rank : rank + 1])
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_train_on_the_loss_of_the_concatenated_batch(tmp_path):
    """Data-parallel training averages gradients over workers: with the positive count and the centerness
    sum all-reduced, that average is the gradient of the single-process loss of both images."""
    import torch.multiprocessing as mp

    from labelmill.models.glip.loss import glip_loss

    torch.multiprocessing.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                                join=True)
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    model, images, ids, mask, targets = _batch()
    loss, _ = glip_loss(model(images, ids, mask), targets, mask)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    mean_loss = (parts[0]["loss"] + parts[1]["loss"]) / 2
    mean_grads = (parts[0]["grads"] + parts[1]["grads"]) / 2
    assert float(mean_loss) == pytest.approx(float(loss), rel=1e-5)
    assert torch.allclose(mean_grads, grads, rtol=1e-4, atol=1e-6)
    assert mp is not None


def test_atss_uses_glips_inclusive_iou_and_inside_margin():
    from labelmill.models.glip.loss import INSIDE_MARGIN, atss_assign, box_iou_inclusive

    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[0.0, 0.0, 4.0, 9.0], [20.0, 20.0, 30.0, 30.0]])
    assert box_iou_inclusive(a, b).tolist() == [[0.5, 0.0]]  # 50 of 100 pixels (torchvision's rule: 36 / 81)
    # one anchor per level, centred 0.005 px inside the box's left edge: not a positive; 0.02 inside: positive
    for inside, expect in ((INSIDE_MARGIN / 2, -1), (INSIDE_MARGIN * 2, 0)):
        cx = 10.0 + inside
        anchor = torch.tensor([[cx - 8, 10.0, cx + 8, 26.0]])
        match = atss_assign([anchor], torch.tensor([[10.0, 8.0, 40.0, 30.0]]), topk=1)
        assert match.tolist() == [expect]


def test_boxes_round_trip_from_teacher_to_target_through_two_rounds():
    """teacher box -> stored row -> training target -> the same box; a student trained on it and relabelling
    stores the same row again, so nothing drifts from round to round.  MDETR gold (COCO xywh) and ODVG gold
    (corners as labelmill's export writes them) give the same targets."""
    import json
    from types import SimpleNamespace

    from labelmill.teachers.hosts import glip_box_to_xywh
    from labelmill.training.glip import gold_records
    from labelmill.training.targets import grounding_target

    rng = np.random.default_rng(0)
    x1y1 = rng.uniform(0, 200, (20, 2)).round()
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(1, 100, (20, 2)).round()], 1).astype(np.float32)
    rows = []
    for box in boxes:  # round 1: the teacher's boxes, at working size = original (scale 1)
        rows.append({"bbox": list(glip_box_to_xywh(box, 1.0, 1.0, 400, 400)), "score": 0.9, "class_name": "a"})
    target = grounding_target(rows)
    assert np.array_equal(target.boxes, boxes)
    again = [{"bbox": list(glip_box_to_xywh(b, 1.0, 1.0, 400, 400)), "score": 0.9, "class_name": "a"}
             for b in target.boxes]  # round 2: the student predicts its targets exactly and stores them
    assert again == rows and np.array_equal(grounding_target(again).boxes, boxes)

    # gold: a COCO/MDETR file of the same rows, and the ODVG export's corners (x2 = x + w)
    tmp = os.environ.get("PYTEST_TMP", "/tmp")
    mdetr = os.path.join(tmp, f"gold-{os.getpid()}.json")
    with open(mdetr, "w") as fh:
        json.dump({"images": [{"id": 1, "file_name": "x.jpg", "caption": "a. "}],
                   "annotations": [{"image_id": 1, "bbox": r["bbox"], "phrase": "a", "tokens_positive": [[0, 1]]}
                                   for r in rows]}, fh)
    odvg = os.path.join(tmp, f"gold-{os.getpid()}.jsonl")
    with open(odvg, "w") as fh:
        regions = [{"bbox": [x, y, x + w, y + h], "phrase": "a", "tokens_positive": [[0, 1]]}
                   for x, y, w, h in (r["bbox"] for r in rows)]
        fh.write(json.dumps({"filename": "x.jpg", "grounding": {"caption": "a. ", "regions": regions}}) + "\n")
    try:
        for path in (mdetr, odvg):
            (rec,) = gold_records(SimpleNamespace(path=path, images="/img", format=None))
            gold = grounding_target(json.loads(rec["labels_json"]))
            assert np.allclose(gold.boxes, boxes, atol=1e-4), path
    finally:
        os.remove(mdetr)
        os.remove(odvg)
