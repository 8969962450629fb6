"""The batched, on-device GLIP post-processing equals the one-image reference.

``select_batch`` + ``merge_and_pack`` are what the predictor runs (on the
GPU when there is one); ``select_detections`` is the readable per-image
reference that the hand-computed tests in test_glip_postprocess.py pin down.
Here they run on random head outputs: on CPU always, and the device path on
CUDA against the CPU reference where a GPU is present.
"""

import pytest
import torch

from labelmill.models.glip.postprocess import merge_and_pack, select_batch, select_detections

LEVELS = [(6, 8), (3, 4), (2, 2)]
STRIDES = [8, 16, 32]


def head_outputs(batch, n_tok, seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(batch, 4, h, w, generator=g) * 0.5 for h, w in LEVELS]
    ctr = [torch.randn(batch, 1, h, w, generator=g) for h, w in LEVELS]
    logits = [torch.randn(batch, h * w, n_tok, generator=g) * 2 for h, w in LEVELS]
    anchors = []
    for (h, w), s in zip(LEVELS, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        centre = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 4).float()
        anchors.append(centre + torch.tensor([-2.0 * s, -2.0 * s, 2.0 * s - 1, 2.0 * s - 1]))
    return deltas, ctr, logits, anchors


def phrase_maps(n_phrases, n_tok, seed):
    g = torch.Generator().manual_seed(seed)
    maps = []
    for p in n_phrases:
        m = torch.zeros(p, n_tok - 2)  # shorter than the logits: padded like the reference does
        for r in range(p):
            toks = torch.randperm(n_tok - 3, generator=g)[: 1 + r % 3] + 1
            m[r, toks] = 1.0 / len(toks)
        maps.append(m)
    return maps


SETTINGS = [
    dict(pre_nms_thresh=0.3, pre_nms_top_n=1000, nms_thresh=0.6, max_detections=100),
    dict(pre_nms_thresh=0.05, pre_nms_top_n=7, nms_thresh=0.5, max_detections=5),
    dict(pre_nms_thresh=0.99, pre_nms_top_n=50, nms_thresh=0.6, max_detections=100),  # nothing passes
]


def reference(deltas, ctr, logits, anchors, maps, sizes, kw):
    return [
        select_detections(
            [d[b] for d in deltas], [c[b] for c in ctr], [t[b] for t in logits], anchors, maps[b], sizes[b], **kw
        )
        for b in range(len(maps))
    ]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g_order = torch.argsort(g.scores.cpu(), descending=True, stable=True)
        w_order = torch.argsort(w.scores, descending=True, stable=True)
        assert g.phrase_indices.cpu()[g_order].tolist() == w.phrase_indices[w_order].tolist()
        assert torch.allclose(g.scores.cpu()[g_order], w.scores[w_order], atol=1e-5)
        assert torch.allclose(g.boxes.cpu()[g_order], w.boxes[w_order], atol=1e-3)


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kw", SETTINGS)
def test_select_batch_equals_per_image_reference(device, kw):
    n_tok = 12
    deltas, ctr, logits, anchors = head_outputs(4, n_tok, seed=1)
    maps = phrase_maps([3, 1, 5, 2], n_tok, seed=2)
    sizes = [(40, 60), (48, 64), (20, 30), (48, 10)]
    want = reference(deltas, ctr, logits, anchors, maps, sizes, kw)
    dev = torch.device(device)
    got = select_batch(
        [d.to(dev) for d in deltas], [c.to(dev) for c in ctr], [t.to(dev) for t in logits],
        [a.to(dev) for a in anchors], [m.to(dev) for m in maps], sizes, **kw,
    )
    assert all(g.boxes.device.type == dev.type for g in got)
    assert_same(got, want)
    if kw["pre_nms_thresh"] < 0.9:
        assert sum(len(w.scores) for w in want) > 5  # the comparison is not vacuous


@pytest.mark.parametrize("device", devices())
def test_merge_and_pack_equals_per_image_merge(device):
    n_tok = 12
    deltas, ctr, logits, anchors = head_outputs(3, n_tok, seed=5)
    maps = phrase_maps([2, 4, 3], n_tok, seed=6)
    kw = SETTINGS[0]
    dets = reference(deltas, ctr, logits, anchors, maps, [(48, 64)] * 3, kw)
    # image 0 = chunks (0, 1), image 1 = chunk 2
    parts = [[dets[0], dets[1]], [dets[2]]]
    offsets = [[0, 2], [0]]
    scales = [(2.0, 1.5), (0.5, 0.25)]
    dev = torch.device(device)
    moved = [[type(d)(d.boxes.to(dev), d.scores.to(dev), d.phrase_indices.to(dev)) for d in p] for p in parts]
    packed, counts = merge_and_pack(moved, offsets, scales, score_floor=0.4, max_detections=6)
    packed = packed.cpu()
    start = 0
    for image_parts, offs, (sx, sy), n in zip(parts, offsets, scales, counts):
        boxes = torch.cat([d.boxes for d in image_parts]) * torch.tensor([sx, sy, sx, sy])
        scores = torch.cat([d.scores for d in image_parts])
        labels = torch.cat([d.phrase_indices + o for d, o in zip(image_parts, offs)])
        keep = scores >= 0.4
        order = torch.argsort(scores[keep], descending=True, stable=True)[:6]
        rows = packed[start : start + n]
        start += n
        assert n == len(order) and n > 0
        assert torch.allclose(rows[:, :4].float(), boxes[keep][order], atol=1e-4)
        assert rows[:, 4].float().tolist() == scores[keep][order].tolist()
        assert rows[:, 5].long().tolist() == labels[keep][order].tolist()
    assert start == packed.shape[0]
