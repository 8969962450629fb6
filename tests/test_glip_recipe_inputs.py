"""GLIP's training inputs: multi-scale resize without crops, batches padded with the mean colour as inference
pads them, other captions packed as negatives, gold sampled at GLIP's rule."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _task(**top):
    from labelmill.training.config import load_train_config
    from labelmill.training.glip import GroundingTask

    cfg = load_train_config("glip", {"data": {"output": "x"}, "checkpoint": {"path": "r"},
                                     "model": {"preset": "tiny", "tokenizer": "builtin-test"}, **top})
    return GroundingTask(cfg.model_dump(mode="json"), {})


def test_recipe_resizes_across_scales_and_pads_with_the_mean_colour():
    from labelmill.training.config import load_train_config

    cfg = load_train_config("glip", {"data": {"output": "x"}, "checkpoint": {"path": "r"},
                                     "model": {"tokenizer": "t"}})
    assert cfg.data.min_size == [480, 560, 640, 720, 800] and cfg.data.max_size == 1333  # MULT_MIN_SIZE_TRAIN
    assert cfg.data.pad == "mean" and cfg.gold_ratio == "auto"
    assert (cfg.negative_captions, cfg.negative_captions_none, cfg.negative_captions_all) == (20, 0.4, 0.5)


def test_multiscale_resize_keeps_every_box_and_flips_inclusive_corners():
    from labelmill.io.images import short_side_size
    from labelmill.training.augment import Augment

    img = np.zeros((300, 500, 3), np.uint8)
    img[100:200, 0:50] = 255  # a white block at the left edge
    boxes = np.array([[0, 100, 49, 199], [490, 0, 499, 299]], np.float32)  # inclusive corners, both at edges
    aug = Augment(512, hflip=True, enabled=True)
    seen_sizes, flipped = set(), 0
    for seed in range(40):
        out, b = aug.boxes_resized(img, boxes, np.random.default_rng(seed), (60, 90, 120), 160)
        h, w = out.shape[:2]
        seen_sizes.add((h, w))
        assert len(b) == 2  # nothing cropped away
        assert (h, w) in {short_side_size(300, 500, s, 160) for s in (60, 90, 120)}
        # the box still frames the white block (flipped or not), and stays inside the image
        x1, y1, x2, y2 = b[0]
        assert 0 <= x1 <= x2 <= w - 1 and 0 <= y1 <= y2 <= h - 1
        block = out[int(np.ceil(y1)) : int(y2) + 1, int(np.ceil(x1)) : int(x2) + 1]
        assert block.mean() > 200
        flipped += x1 > w / 2
    assert len(seen_sizes) == 3 and (96, 160) in seen_sizes  # the long side capped at max_size
    assert 5 < flipped < 35
    # without augmentation: the largest scale, no flip; an exact flip round trip maps the box to itself
    out, b = Augment(512, enabled=False).boxes_resized(img, boxes, np.random.default_rng(0), (60, 90, 120), 160)
    assert out.shape[:2] == short_side_size(300, 500, 120, 160)
    w = out.shape[1]
    again = np.stack([w - 1 - b[:, 2], b[:, 1], w - 1 - b[:, 0], b[:, 3]], 1)
    assert np.allclose(np.stack([w - 1 - again[:, 2], again[:, 1], w - 1 - again[:, 0], again[:, 3]], 1), b)


def test_trainer_pads_each_batch_with_the_mean_colour_like_inference():
    import torch

    from labelmill.models.glip.preprocess import pad_to, prepare_image
    from labelmill.training.prepare import ragged

    task = _task()
    a = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    b = np.random.default_rng(1).integers(0, 255, (66, 50, 3), dtype=np.uint8)
    batch = {"image": ragged([a, b]), "caption": np.array(["a cat. ", "a dog. "], object),
             "boxes_json": np.array([json.dumps([[1, 1, 20, 20]])] * 2, object),
             "spans_json": np.array([json.dumps([[[0, 5]]])] * 2, object), "packable": np.array([False, False])}
    inputs = task.inputs(batch, torch.device("cpu"))
    images = inputs["images"]
    assert tuple(images.shape) == (2, 3, 96, 96)  # max sides rounded up to size_divisibility 32
    # inference's own preprocessing of an image already at its size, padded the same way: identical tensors
    arch = task.arch
    ref = pad_to([prepare_image(x, arch.pixel_mean, arch.pixel_std, min(x.shape[:2]), 10_000).tensor
                  for x in (a, b)], (96, 96))
    assert torch.allclose(images, ref, atol=1e-5)
    assert float(images[0, :, 40:, :].abs().max()) == 0.0  # the mean colour, 0 after normalising


def test_pack_caption_keeps_the_positive_whole_and_its_spans_on_the_same_words():
    from labelmill.training.targets import pack_caption

    caption = "a red block on grass"
    spans = [[[2, 11]], [[15, 20]]]
    negatives = [f"negative caption number {i}" for i in range(30)]
    length = lambda text: len(text.split()) + 2  # noqa: E731 - words + [CLS] [SEP]
    for seed in range(20):
        packed, moved = pack_caption(caption, spans, negatives, 24, length, np.random.default_rng(seed))
        assert [packed[s:e] for (s, e), in moved] == ["red block", "grass"]
        assert caption + "." in packed and packed.endswith(". ")
        parts = [p for p in packed.split(". ") if p]
        assert sum(length(p) for p in parts) <= 24  # the positive never runs past the tokenizer's limit
        assert len(parts) >= 2
    assert pack_caption(caption, spans, [], 24, length, np.random.default_rng(0)) == (caption, spans)


def test_caption_prompts_get_other_captions_at_glips_rates():
    task = _task()
    captions = [f"photo {i} of a thing" for i in range(8)]
    batch = {"caption": np.array(captions, object), "spans_json": np.array([json.dumps([[[0, 5]]])] * 8, object),
             "packable": np.array([True] * 7 + [False])}
    packed_n = unpacked = 0
    for _ in range(60):
        out, spans = task.prompts(batch)
        assert out[7] == captions[7]  # gold / vocabulary prompts are never packed
        for c, o, s in zip(captions[:7], out[:7], spans[:7]):
            assert o[s[0][0][0] : s[0][0][1]] == "photo"
            if o == c:
                unpacked += 1
            else:
                packed_n += 1
                assert c + "." in o and len(task.tokenizer(o)["input_ids"]) <= task.arch.max_query_len
    share = unpacked / (unpacked + packed_n)
    assert 0.3 < share < 0.55  # 0.4 never packs (a few more when a drawn number is 0)
    off = _task(negative_captions=0)
    assert off.prompts(batch)[0] == captions


def test_gold_is_sampled_at_glips_rule():
    from labelmill.training.glip import gold_share

    assert gold_share("auto", [], 100) == 0.0
    assert gold_share("auto", [(10, 4)], 10) == pytest.approx(0.8)  # 10 x 4 copies against 10
    assert gold_share("auto", [(10, 8), (20, 4)], 840) == pytest.approx(160 / 1000)
    assert gold_share(0.25, [(10, 4)], 10) == 0.25
    task = _task()
    task.gold_ratio, task.gold_drawn = 0.3, True
    counts = [task.gold_count(8) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(0.3 * 8, rel=0.05) and len(set(counts)) > 3
