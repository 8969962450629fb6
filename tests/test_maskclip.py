"""MaskCLIP teacher: the dense value path, refinements, resampling and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from helpers import TINY_CLIP, photo
from labelmill.models.openclip import DenseCLIP, encode_text_trimmed, load_clip
from labelmill.teachers.base import ImageBatch, WeightsError
from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher, slide_starts
from labelmill.teachers.vocab import load_templates, load_vocabulary

VOCAB = ["cat", "dog", "grass", "sky", "road"]


def teacher(**kw) -> MaskCLIPTeacher:
    cfg = MaskCLIPConfig(type="maskclip", pretrained=None, arch_config=TINY_CLIP, vocabulary=VOCAB,
                         templates="single", image_size=64, logit_scale=100.0, **kw)
    return MaskCLIPTeacher(cfg, torch.device("cpu"), allow_random_init=True)


def batch_of(*arrays, orig=None) -> ImageBatch:
    side = max(max(a.shape[:2]) for a in arrays)
    canvas = torch.zeros(len(arrays), side, side, 3, dtype=torch.uint8)
    for i, a in enumerate(arrays):
        canvas[i, : a.shape[0], : a.shape[1]] = torch.from_numpy(a)
    hw = [a.shape[:2] for a in arrays]
    return ImageBatch(canvas, hw, orig or hw, [None] * len(arrays), [str(i) for i in range(len(arrays))],
                      [{}] * len(arrays))


def test_dense_value_path_matches_direct_computation():
    model, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True)
    dense = DenseCLIP(model)
    v = model.visual
    sd = {k: t.detach() for k, t in v.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = dense(x, with_global=True)
        # direct computation from the state dict
        t = F.conv2d(x, sd["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
        t = torch.cat([sd["class_embedding"].expand(2, 1, -1), t], 1) + sd["positional_embedding"]
        t = F.layer_norm(t, (64,), sd["ln_pre.weight"], sd["ln_pre.bias"])
        t = v.transformer.resblocks[0](t)
        p = "transformer.resblocks.1."
        y = F.layer_norm(t[:, 1:], (64,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        w_v, b_v = sd[p + "attn.in_proj_weight"][128:], sd[p + "attn.in_proj_bias"][128:]
        val = y @ w_v.T + b_v
        out = t[:, 1:] + val @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(out, (64,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        out = out + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        out = F.layer_norm(out, (64,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]
        expected = out.transpose(1, 2).reshape(2, 32, 4, 4)
        keys = y @ sd[p + "attn.in_proj_weight"][64:128].T + sd[p + "attn.in_proj_bias"][64:128]
        keys = keys @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]  # as MaskCLIP's q, k, v
    assert torch.allclose(got.features, expected, atol=1e-5)
    assert torch.allclose(got.keys, keys, atol=1e-5)
    # the class-token path is open_clip's own image embedding
    assert torch.allclose(got.global_embedding, model.encode_image(x), atol=1e-5)


def test_positional_embedding_is_resized_for_other_grids():
    model, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True)
    dense = DenseCLIP(model)
    out = dense(torch.randn(1, 3, 96, 128))
    assert out.features.shape == (1, 32, 6, 8)


def test_trimmed_text_encoder_equals_open_clip():
    import open_clip

    model, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True)
    tok = open_clip.get_tokenizer("ViT-B-16")
    tokens = tok(["a photo of a cat.", "the embroidered hot dog in a video game."])
    assert torch.allclose(encode_text_trimmed(model, tokens), model.encode_text(tokens), atol=1e-5)


def test_random_weights_need_explicit_permission():
    with pytest.raises(WeightsError, match="no weights"):
        load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=False)
    with pytest.raises(WeightsError, match="neither an existing file nor"):
        load_clip("ViT-B-32", "no-such-tag")


def test_local_checkpoint_is_loaded_and_hashed(tmp_path):
    import hashlib

    model, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True, seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, weights, _ = load_clip("x", str(path), arch_config=TINY_CLIP, quick_gelu=False)
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_templates_and_vocabularies(tmp_path):
    assert len(load_templates("maskclip85")) == 85
    assert len(load_vocabulary("coco-stuff-171")) == 171
    assert len(load_vocabulary("pascal-context-59")) == 59
    f = tmp_path / "v.txt"
    f.write_text("# my classes\nperson, human\n\ncar\n")
    v = load_vocabulary({"file": str(f)})
    assert v.names == ("person", "car") and v.synonyms[0] == ("person", "human")
    with pytest.raises(ValueError, match="repeats"):
        load_vocabulary(["a", "a"])


def test_class_scores_are_distributions_at_original_size():
    t = teacher()
    b = batch_of(photo(64, 48, 1), photo(40, 64, 2), orig=[(480, 640), (640, 400)])
    scores = t.class_scores(b)
    assert [s.shape for s in scores] == [(5, 480, 640), (5, 640, 400)]
    for s in scores:
        assert torch.allclose(s.sum(0), torch.ones(1), atol=1e-4)
    grid = t.class_scores(b, size="grid")
    # 480x640 -> short side 64: 64 x 85, padded to 64 x 96: 4 x 6 patches of 16
    assert grid[0].shape == (5, 4, 6)


def test_masks_partition_the_argmax_of_the_scores():
    t = teacher(key_smoothing={"enabled": False, "threshold": 1.0},
                prompt_denoising={"enabled": False, "threshold": 0.5})
    b = batch_of(photo(64, 48, 5), orig=[(96, 128)])
    (out,) = t.predict(b, {})
    (scores,) = t.class_scores(b)
    argmax = scores.argmax(0).numpy()
    assert out.labels, "random weights still produce an argmax map"
    total = 0
    for lab in out.labels:
        m = mask_utils.decode({"size": lab.rle["size"], "counts": lab.rle["counts"].encode()})
        cls = VOCAB.index(lab.class_name)
        assert np.array_equal(m.astype(bool), argmax == cls)
        assert lab.area == m.sum()
        ys, xs = np.nonzero(m)
        assert lab.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert abs(lab.score - float(scores[cls][argmax == cls].mean())) < 1e-4
        total += m.sum()
    assert total == 96 * 128


def test_background_classes_produce_no_masks():
    t = teacher(background=VOCAB, prompt_denoising={"enabled": False, "threshold": 0.5})
    (out,) = t.predict(batch_of(photo(64, 48, 5)), {})
    assert out.labels == []


def test_slide_windows_cover_the_image():
    assert slide_starts(100, 64, 32) == [0, 32, 36]
    assert slide_starts(64, 64, 32) == [0]
    assert slide_starts(40, 64, 32) == [0]  # smaller than the crop: one smaller window
    t = teacher(mode="slide", slide_short_side=80, slide_max_long_side=160, slide_crop=64, slide_stride=32)
    b = batch_of(photo(96, 64, 3), orig=[(300, 450)])
    (sm,) = t.score_maps(b)
    assert sm.work_hw == (80, 120)  # no snapping of the sides to the patch size
    (s,) = t.class_scores(b)
    assert s.shape == (5, 300, 450) and torch.allclose(s.sum(0), torch.ones(1), atol=1e-4)


def _activation(model):
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_openai_format_local_checkpoint_gets_quick_gelu(tmp_path):
    """OpenAI's files carry input_resolution/context_length/vocab_size; they were trained with QuickGELU."""
    ref, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True, quick_gelu=True, seed=5)
    sd = dict(ref.state_dict())
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai-format.pt"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, path)
    loaded, _, _ = load_clip("x", str(path), arch_config=TINY_CLIP)
    assert _activation(loaded) == "QuickGELU"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), ref.half().float().encode_image(x), atol=1e-4)


def test_local_checkpoint_without_activation_is_refused(tmp_path):
    model, _, _ = load_clip("x", None, arch_config=TINY_CLIP, allow_random_init=True)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="quick_gelu: true for OpenAI"):
        load_clip("x", str(path), arch_config=TINY_CLIP)
    assert _activation(load_clip("x", str(path), arch_config=TINY_CLIP, quick_gelu=True)[0]) == "QuickGELU"
    assert _activation(load_clip("x", str(path), arch_config=TINY_CLIP, quick_gelu=False)[0]) == "GELU"
    # the check runs in the driver's preflight too, before Ray starts
    cfg = MaskCLIPConfig(type="maskclip", model="ViT-B-16", pretrained=str(path))
    with pytest.raises(WeightsError, match="quick_gelu"):
        cfg.preflight(allow_random_init=False)


def test_key_smoothing_cosine_rule_is_the_documented_option():
    """key_smoothing.rule: cosine = cosine similarity of keys, negatives clamped, rows normalised."""
    t = teacher(key_smoothing={"enabled": True, "threshold": 1.0, "rule": "cosine"},
                prompt_denoising={"enabled": False, "threshold": 0.5})
    x = torch.randn(1, 3, 64, 64)
    out = t.dense(x)
    got = t.head(out.features[0], out.keys[0]).flatten(1)
    cos = t.classifier @ F.normalize(out.features[0].flatten(1), dim=0)
    probs = (cos * 100).softmax(0)
    k = F.normalize(out.keys[0], dim=-1)
    w = (k @ k.T).clamp_min(0)
    w = w / w.sum(1, keepdim=True)
    assert torch.allclose(got, probs @ w.T, atol=1e-5)


def _numpy_labels(t, scores: torch.Tensor, orig_hw, label_hw):
    """The earlier CPU path: argmax and confidence to numpy, nearest upsampling, then pycocotools."""
    c = len(VOCAB)
    conf = scores.numpy()
    arg = conf.argmax(0)
    best = conf.max(0)
    if t.config.pixel_threshold > 0:
        arg = np.where(best < t.config.pixel_threshold, c, arg)
    H, W = orig_hw
    lh, lw = label_hw
    if (lh, lw) != (H, W):
        rows = ((np.arange(H) + 0.5) * lh / H).astype(np.int64)
        cols = ((np.arange(W) + 0.5) * lw / W).astype(np.int64)
        arg, best = arg[rows][:, cols], best[rows][:, cols]
    full = np.asfortranarray(arg)
    out = {}
    for k in range(c):
        m = full == k
        if not m.any():
            continue
        rle = mask_utils.encode(m.view(np.uint8))
        out[VOCAB[k]] = (rle["counts"].decode(), float(mask_utils.area(rle)),
                         tuple(float(v) for v in mask_utils.toBbox(rle)), float(best[m].mean()))
    return out


@pytest.mark.parametrize("kw,label_hw", [
    ({}, (96, 128)),
    ({"pixel_threshold": 0.5, "key_smoothing": {"enabled": False, "threshold": 1.0}}, (96, 128)),
    ({"label_resolution": 40}, (30, 40)),
])
def test_device_post_processing_equals_the_numpy_path(kw, label_hw, monkeypatch):
    t = teacher(**kw)
    b = batch_of(photo(64, 48, 5), photo(48, 64, 6), orig=[(96, 128), (128, 96)])
    maps = t.score_maps(b)
    import labelmill.teachers.maskclip as mc

    copies = []
    real_copy, real_cpu = mc.HostCopy, torch.Tensor.cpu
    monkeypatch.setattr(mc, "HostCopy", lambda tensor: copies.append(tensor.shape) or real_copy(tensor))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append("cpu") or real_cpu(self, *a, **k))
    labels = t.labels_from_maps(maps)
    monkeypatch.undo()
    assert len(copies) == 1 and copies[0] != "cpu"  # one device-to-host copy for the whole batch
    hws = [label_hw, label_hw[::-1]]
    for sm, labs, hw in zip(maps, labels, hws):
        expected = _numpy_labels(t, t.confidence(t.seg_logits(sm, hw)), sm.orig_hw, hw)
        got = {lab.class_name: (lab.rle["counts"], lab.area, lab.bbox, lab.score) for lab in labs}
        assert got.keys() == expected.keys() and got
        for name, (counts, area, bbox, score) in got.items():
            e_counts, e_area, e_bbox, e_score = expected[name]
            assert (counts, area, bbox) == (e_counts, e_area, e_bbox)
            assert abs(score - e_score) < 1e-5


@pytest.mark.parametrize("key_smoothing", [True, False])
@pytest.mark.parametrize("grid,work,orig", [
    ((7, 10), (224, 320), (480, 686)),   # whole mode: patch grid -> resized image -> larger original
    ((6, 9), (64, 96), (40, 60)),        # an original smaller than the working image
    ((48, 64), (48, 64), (96, 128)),     # slide mode: logits already on the working image's pixels
])
def test_pruned_argmax_equals_every_class_resampled(key_smoothing, grid, work, orig):
    """Only classes that can win in a band are resampled; labels and confidences stay exact."""
    from labelmill.teachers.labelmap import pruned_argmax, resample
    from labelmill.teachers.maskclip import ScoreMap, upsample

    vocab = [f"c{i}" for i in range(40)]
    cfg = MaskCLIPConfig(type="maskclip", pretrained=None, arch_config=TINY_CLIP, vocabulary=vocab,
                         templates="single", image_size=64, logit_scale=30.0,
                         key_smoothing={"enabled": key_smoothing, "threshold": 1.0})
    t = MaskCLIPTeacher(cfg, torch.device("cpu"), allow_random_init=True)
    g = torch.Generator().manual_seed(sum(grid) + key_smoothing)
    # peaked maps, as a trained CLIP gives, with some classes changing sign on the grid
    coarse = torch.randn(40, 2, 3, generator=g) + 3 * (torch.rand(40, 1, 1, generator=g) > 0.85)
    logits = torch.softmax(4 * F.interpolate(coarse[None], size=grid, mode="bilinear")[0], dim=0)
    logits[:5] -= 0.02
    sm = ScoreMap(logits=logits, work_hw=work, orig_hw=orig)
    full = resample(logits, work, orig)
    # the folded resize is mmseg's two bilinear resizes, up to float rounding
    assert (full - upsample(upsample(logits, work), orig)).abs().max() < 1e-5
    best, want = full.max(dim=0)
    pruned_best, pruned_arg = pruned_argmax(logits, work, orig)
    assert torch.equal(pruned_arg, want) and torch.equal(pruned_best, best)  # bit for bit
    arg, conf = t.label_map(sm)
    assert torch.equal(arg, want)
    if key_smoothing:
        expect = best.clamp_min(0) / full.clamp_min(0).sum(dim=0).clamp_min(1e-12)
    else:
        expect = torch.softmax(full * t.logit_scale, dim=0).max(dim=0).values
    assert torch.allclose(conf, expect, atol=1e-5)


def test_pruned_argmax_computes_few_classes_per_band(monkeypatch):
    """The pruning does its job: on a peaked map most bands resample one or two classes, not all."""
    from labelmill.teachers import labelmap

    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(60, 3, 4, generator=g) * 3
    logits = torch.softmax(4 * F.interpolate(coarse[None], size=(7, 10), mode="bilinear")[0], dim=0)
    counts = []
    real = labelmap.resample_rows
    monkeypatch.setattr(labelmap, "resample_rows", lambda cols, *a: counts.append(len(cols)) or real(cols, *a))
    best, arg = labelmap.pruned_argmax(logits, (224, 320), (480, 686))
    monkeypatch.undo()
    assert torch.equal(arg, labelmap.resample(logits, (224, 320), (480, 686)).max(dim=0).indices)
    corners, bands = counts[0], counts[1:]  # every class at the tiles' corners, then one pass per band
    assert corners == 60 and len(bands) == len(labelmap._segments(7, 224, 480, labelmap.TILE_ROWS))
    assert sum(bands) / len(bands) < 4 and max(bands) < 20  # classes computed per pixel, of 60


def test_flat_maps_fall_back_to_every_class_with_the_same_result(monkeypatch):
    """Noisy maps (a random tiny model) leave most classes possible in most tiles: then every class
    is resampled instead, with the same argmax, values and normaliser."""
    from labelmill.teachers import labelmap

    g = torch.Generator().manual_seed(5)
    logits = 1 / 6 + 0.05 * torch.randn(6, 12, 15, generator=g)  # noise: every tile is contested
    logits[:2] -= 0.2  # some classes change sign
    calls = []
    real = labelmap.full_labels
    monkeypatch.setattr(labelmap, "full_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    best, arg, norm = labelmap.pruned_labels(logits, (192, 240), (300, 400), clamp_sum=True)
    assert calls == [1]
    full = labelmap.resample(logits, (192, 240), (300, 400))
    want_best, want_arg = full.max(dim=0)
    assert torch.equal(arg, want_arg) and torch.equal(best, want_best)
    assert torch.allclose(norm, full.clamp_min(0).sum(dim=0), rtol=1e-5)


def test_predict_async_finishes_later_with_the_same_labels():
    """The label stage finishes batch i on another thread while batch i+1 runs: two batches queued,
    finished in the opposite order, give exactly the labels of ``predict``."""
    t = teacher()
    first, second = batch_of(photo(64, 48, 5), photo(48, 64, 6)), batch_of(photo(80, 56, 7), orig=[(120, 90)])
    a, b = t.predict_async(first, {}), t.predict_async(second, {})
    got_b, got_a = b.result(), a.result()
    for got, batch in ((got_a, first), (got_b, second)):
        want = t.predict(batch, {})
        assert [o.labels for o in got] == [o.labels for o in want]
        assert all(o.labels for o in got)
        assert all(o.extras["score_map"].orig_hw == w.extras["score_map"].orig_hw for o, w in zip(got, want))
