"""Post-processing on hand-built predictions with hand-computed expectations."""

import math

import pytest
import torch

from labelmill.models.glip.anchors import AnchorGenerator, cell_anchors, decode_boxes
from labelmill.models.glip.postprocess import keep_top, nms_per_phrase, phrase_scores, select_detections


def logit(p):
    return math.log(p / (1 - p))


def level(deltas, ctr_logits, token_logits):
    """One level with H=1, W=len(deltas): tensors shaped as select_detections expects."""
    w = len(deltas)
    d = torch.tensor(deltas, dtype=torch.float32).t().reshape(4, 1, w)
    c = torch.tensor(ctr_logits, dtype=torch.float32).reshape(1, 1, w)
    t = torch.tensor(token_logits, dtype=torch.float32)
    return d, c, t


# Phrase 0 = tokens 1 and 2, phrase 1 = token 3 (token 0 plays [CLS]).
PMAP = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
ANCHORS = torch.tensor([[0.0, 0.0, 15.0, 15.0], [16.0, 0.0, 31.0, 15.0]])
# loc0: p(t1)=0.5, p(t2)=0.7 -> phrase0 0.6; p(t3)=0.1 -> phrase1 0.1; centerness 0.5
# loc1: p(t1)=p(t2)=0.2 -> phrase0 0.2; p(t3)=0.9 -> phrase1 0.9; centerness 0.75
TOKENS = [[0.0, logit(0.5), logit(0.7), logit(0.1)], [0.0, logit(0.2), logit(0.2), logit(0.9)]]
# loc0 keeps its anchor; loc1 moves right by one anchor width and doubles its width.
DELTAS = [[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 5.0 * math.log(2.0), 0.0]]
CTR = [0.0, math.log(3.0)]


def run(**overrides):
    d, c, t = level(DELTAS, CTR, TOKENS)
    kwargs = dict(pre_nms_thresh=0.15, pre_nms_top_n=1000, nms_thresh=0.6, max_detections=100)
    kwargs.update(overrides)
    return select_detections([d], [c], [t], [ANCHORS], PMAP, (16, 48), **kwargs)


def test_hand_computed_scores_boxes_and_order():
    det = run()
    # Candidates above 0.15: (loc1, ph1) 0.9, (loc0, ph0) 0.6, (loc1, ph0) 0.2; final = sqrt(p * ctr).
    assert det.phrase_indices.tolist() == [1, 0, 0]
    expected_scores = [math.sqrt(0.9 * 0.75), math.sqrt(0.6 * 0.5), math.sqrt(0.2 * 0.75)]
    assert det.scores.tolist() == pytest.approx(expected_scores, abs=1e-6)
    # loc1 decodes to centre 39.5, width 32 -> [24, 0, 55, 15], clipped to width 48 -> x2 = 47.
    expected_boxes = [[24, 0, 47, 15], [0, 0, 15, 15], [24, 0, 47, 15]]
    assert torch.allclose(det.boxes, torch.tensor(expected_boxes, dtype=torch.float32), atol=1e-4)


def test_threshold_is_applied_to_phrase_probability_before_centerness():
    # 0.6 * 0.5 = 0.3 < 0.35 but the phrase probability 0.6 passes: kept.
    det = run(pre_nms_thresh=0.35)
    assert sorted(det.scores.tolist()) == pytest.approx(sorted([math.sqrt(0.675), math.sqrt(0.3)]), abs=1e-6)


def test_pre_nms_top_n_ranks_by_score_times_centerness():
    det = run(pre_nms_top_n=2)  # products 0.675, 0.3, 0.15 -> the 0.15 one goes
    assert det.scores.tolist() == pytest.approx([math.sqrt(0.675), math.sqrt(0.3)], abs=1e-6)


def test_max_detections():
    det = run(max_detections=1)
    assert det.phrase_indices.tolist() == [1]


def test_nms_is_per_phrase():
    anchors = torch.tensor([[0.0, 0.0, 15.0, 15.0], [2.0, 0.0, 17.0, 15.0]])  # IoU 224/288 = 0.78
    tokens = [[0.0, logit(0.8), logit(0.8), logit(0.6)], [0.0, logit(0.7), logit(0.7), logit(0.7)]]
    d, c, t = level([[0.0] * 4, [0.0] * 4], [0.0, 0.0], tokens)
    det = select_detections([d], [c], [t], [anchors], PMAP, (16, 48), pre_nms_thresh=0.05, pre_nms_top_n=1000, nms_thresh=0.6, max_detections=100)
    # Phrase 0: 0.8 (loc0) suppresses 0.7 (loc1).  Phrase 1: 0.7 (loc1) suppresses 0.6 (loc0).
    assert sorted(zip(det.phrase_indices.tolist(), det.scores.tolist())) == [
        (0, pytest.approx(math.sqrt(0.8 * 0.5))),
        (1, pytest.approx(math.sqrt(0.7 * 0.5))),
    ]
    assert torch.allclose(det.boxes[det.phrase_indices == 0], anchors[:1])
    assert torch.allclose(det.boxes[det.phrase_indices == 1], anchors[1:])


def test_nms_overlap_uses_inclusive_pixel_extents():
    # Inclusive areas: 100 and 62, IoU 0.62 > 0.6 (suppressed).  With exclusive
    # extents the IoU would be 46.8 / 81 = 0.578 and both would survive.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 5.2]])
    keep = nms_per_phrase(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.6)
    assert keep.tolist() == [0]
    keep = nms_per_phrase(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.6)
    assert keep.tolist() == [0, 1]


def test_keep_top_keeps_ties_at_the_cut():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    assert keep_top(scores, 2).tolist() == [True, True, True, False]
    assert keep_top(scores, 1).tolist() == [True, False, False, False]
    assert keep_top(scores, 10).all()


def test_phrase_scores_average_token_probabilities():
    logits = torch.tensor([[0.0, logit(0.5), logit(0.7), logit(0.1), 5.0]])  # one extra padded token
    scores = phrase_scores(logits, PMAP)
    assert scores.tolist()[0] == pytest.approx([0.6, 0.1], abs=1e-6)


def test_empty_candidates_give_empty_result():
    det = run(pre_nms_thresh=0.95)
    assert det.boxes.shape == (0, 4) and det.scores.numel() == 0 and det.phrase_indices.numel() == 0


def test_decode_clamps_large_size_deltas():
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # width 10, centre 4.5
    box = decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchors)[0]
    width = box[2] - box[0] + 1
    assert width.item() == pytest.approx(10 * 1000 / 16, rel=1e-5)
    assert box[1].item() == pytest.approx(0.0) and box[3].item() == pytest.approx(9.0)


def test_glip_t_cell_anchors_and_grid():
    # Sizes 64..1024 at strides 8..128, one square anchor centred on (stride-1)/2.
    gen = AnchorGenerator((64, 128, 256, 512, 1024), (8, 16, 32, 64, 128), (1.0,))
    assert gen.cell_anchors[0].tolist() == [[-28.0, -28.0, 35.0, 35.0]]
    assert gen.cell_anchors[4].tolist() == [[-448.0, -448.0, 575.0, 575.0]]
    grid = gen([(2, 3), (1, 1), (1, 1), (1, 1), (1, 1)])[0]
    # Row-major: location (row 1, col 2) is index 5, shifted by (16, 8).
    assert grid[5].tolist() == [-28.0 + 16, -28.0 + 8, 35.0 + 16, 35.0 + 8]
    assert cell_anchors(16, (32.0,), (0.5,)).tolist() == [[-15.0, -4.0, 30.0, 19.0]]
