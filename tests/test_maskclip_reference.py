"""Parity of the MaskCLIP teacher with an independent re-implementation of the published method.

The reference below is written from the paper (Zhou, Loy, Dai: "Extract Free
Dense Labels from CLIP", ECCV 2022) and the semantics of its mmseg code
(``MaskClipHead.refine_output``, the ViT backbone's ``return_qkv`` path,
``EncoderDecoder.whole_inference`` / ``slide_inference``), working straight
from the open_clip state dict with plain tensor ops, in the layouts the
reference uses ([N, HW, C] keys, [N, C, H, W] logits).  It calls no
labelmill code; the text classifier is an input, as the reference loads
precomputed text embeddings.  Everything runs in fp32 on a tiny random CLIP.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from helpers import TINY_CLIP, photo
from labelmill.teachers.base import ImageBatch
from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher

VOCAB = ["cat", "dog", "grass", "sky", "road", "tree", "wall"]
TOL = 1e-4


# --------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _attention(x, sd, p, heads):
    n, length, width = x.shape
    qkv = x @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in qkv.split(width, dim=-1))
    att = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(dim=-1)
    out = (att @ v).transpose(1, 2).reshape(n, length, width)
    return out @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]


def _ffn(x, sd, p):
    h = F.gelu(x @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_backbone(sd, img, heads, layers, patch=16):
    """ViT with MaskCLIP's last layer: returns v-path features [1, D, h, w] and keys [1, HW, C]."""
    # AdaptivePadding('corner'): zero-pad bottom/right to a patch multiple
    h, w = img.shape[-2:]
    img = F.pad(img, (0, -w % patch, 0, -h % patch))
    x = F.conv2d(img, sd["conv1.weight"], stride=patch)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = sd["positional_embedding"]
    side = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)  # resize_pos_embed
    pos = torch.cat([pos[:1], grid.flatten(2)[0].T], dim=0)
    x = torch.cat([sd["class_embedding"].expand(1, 1, -1), x], dim=1) + pos
    x = _ln(x, sd, "ln_pre")
    for i in range(layers - 1):
        p = f"transformer.resblocks.{i}."
        x = x + _attention(_ln(x, sd, p + "ln_1"), sd, p, heads)
        x = x + _ffn(_ln(x, sd, p + "ln_2"), sd, p)
    p = f"transformer.resblocks.{layers - 1}."
    y = _ln(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    width = x.shape[-1]
    q, k, v = (t @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"] for t in y.split(width, dim=-1))
    v = v + x
    v = v + _ffn(_ln(v, sd, p + "ln_2"), sd, p)
    v = _ln(v, sd, "ln_post")[:, 1:] @ sd["proj"]  # final norm, then the head's 1x1 projection
    feat = v.transpose(1, 2).reshape(1, -1, gh, gw)
    return feat, k[:, 1:]


def ref_head(feat, k, text, pd_thresh, ks_thresh, scale=100.0):
    """cls_seg + refine_output: [1, C, h, w] output."""
    feat = feat / feat.norm(dim=1, keepdim=True)
    output = F.conv2d(feat, text[:, :, None, None])
    if pd_thresh > 0:
        n, c, h, w = output.shape
        conf = F.softmax(output * scale, dim=1).view(n, c, -1).max(dim=-1)[0]
        selected = (conf < pd_thresh)[:, :, None, None].expand(n, c, h, w)
        output = output.clone()
        output[selected] = -100
    if ks_thresh > 0:
        output = F.softmax(output * scale, dim=1)
        n, c, h, w = output.shape
        output = output.view(n, c, -1).transpose(-2, -1)  # [N, HW, C]
        k = F.normalize(k, p=2)  # dim=1 of [N, HW, C]: over the positions
        weight = k @ k.transpose(-2, -1)
        selected = (output.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, c)
        weighted = weight @ output
        output = output.clone()
        output[selected] = weighted[selected]
        output = output.transpose(-2, -1).reshape(n, c, h, w)
    return output


def ref_encode_decode(sd, img, text, cfg):
    feat, k = ref_backbone(sd, img, cfg["heads"], cfg["layers"])
    out = ref_head(feat, k, text, cfg["pd"], cfg["ks"], cfg["scale"])
    return F.interpolate(out, size=img.shape[-2:], mode="bilinear", align_corners=False)


def ref_slide(sd, img, text, cfg, crop, stride):
    _, _, h_img, w_img = img.shape
    c = text.shape[0]
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, c, h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logit = ref_encode_decode(sd, img[:, :, y1:y2, x1:x2], text, cfg)
            preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def ref_inference(sd, img, text, cfg, orig_hw, slide=None):
    """seg_logit at the original size (mmseg's inference with rescale)."""
    logit = ref_slide(sd, img, text, cfg, *slide) if slide else ref_encode_decode(sd, img, text, cfg)
    return F.interpolate(logit, size=orig_hw, mode="bilinear", align_corners=False)[0]


# --------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------


def make_teacher(**kw) -> MaskCLIPTeacher:
    cfg = MaskCLIPConfig(type="maskclip", pretrained=None, arch_config=TINY_CLIP, vocabulary=VOCAB,
                         templates="single", image_size=64, logit_scale=100.0, precision="fp32", **kw)
    return MaskCLIPTeacher(cfg, torch.device("cpu"), allow_random_init=True)


def normalised(t, arr):
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)[None]
    return (x - t.mean[None]) / t.std[None]


def batch_of(arrays, origs):
    side = max(max(a.shape[:2]) for a in arrays)
    canvas = torch.zeros(len(arrays), side, side, 3, dtype=torch.uint8)
    for i, a in enumerate(arrays):
        canvas[i, : a.shape[0], : a.shape[1]] = torch.from_numpy(a)
    return ImageBatch(canvas, [a.shape[:2] for a in arrays], origs, [None] * len(arrays),
                      [str(i) for i in range(len(arrays))], [{}] * len(arrays))


def ref_cfg(t, pd, ks):
    return {"heads": 2, "layers": 2, "pd": pd, "ks": ks, "scale": t.logit_scale}


def check_argmax(labels, ref_logit):
    """The teacher's masks are exactly the reference's argmax (pixels in near-ties excepted)."""
    top2 = ref_logit.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > TOL
    argmax = ref_logit.argmax(0)
    label_map = torch.full(argmax.shape, -1)
    for lab in labels:
        m = mask_utils.decode({"size": lab.rle["size"], "counts": lab.rle["counts"].encode()})
        label_map[torch.from_numpy(m.astype(bool))] = VOCAB.index(lab.class_name)
    assert decided.float().mean() > 0.95
    assert torch.equal(label_map[decided], argmax[decided])


# 48x64 working images of 96x128 originals: short side 64 -> 64 x 85 (not square, not a patch multiple)
CASES = [
    pytest.param(0.0, 0.0, id="plain"),
    pytest.param(0.0, 1.0, id="key-smoothing"),
    pytest.param(0.9, 0.0, id="prompt-denoising"),
    pytest.param(0.9, 1.0, id="both"),
    pytest.param(0.0, 0.6, id="key-smoothing-threshold"),
]


@pytest.mark.parametrize("pd,ks", CASES)
def test_whole_mode_matches_reference_on_non_square_images(pd, ks):
    t = make_teacher(prompt_denoising={"enabled": pd > 0, "threshold": pd},
                     key_smoothing={"enabled": ks > 0, "threshold": ks})
    sd = {k: v.detach() for k, v in t.clip.visual.state_dict().items()}
    text = t.classifier.float()
    images = [photo(85, 64, 11), photo(64, 85, 12)]  # landscape and portrait, already at the resize target
    origs = [(96, 128), (128, 96)]
    b = batch_of(images, origs)
    maps = t.score_maps(b)  # both images in one batch: different grids, padded and masked
    outs = t.predict(b, {})
    for arr, orig, sm, out in zip(images, origs, maps, outs):
        ref = ref_inference(sd, normalised(t, arr), text, ref_cfg(t, pd, ks), orig)
        got = t.seg_logits(sm)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < TOL
        check_argmax(out.labels, ref)


def test_prompt_denoising_drops_classes_like_the_reference():
    t = make_teacher(prompt_denoising={"enabled": True, "threshold": 0.9},
                     key_smoothing={"enabled": False, "threshold": 1.0})
    (sm,) = t.score_maps(batch_of([photo(64, 64, 3)], [(64, 64)]))
    dropped = (sm.logits == -100).flatten(1).all(1)
    assert dropped.any() and not dropped.all()


def test_prompt_denoising_that_drops_every_class():
    """The reference drops every class when none passes; labelmill keeps them all by default (option)."""
    arr, orig = photo(64, 64, 4), (64, 64)
    b = batch_of([arr], [orig])
    ref_t = make_teacher(prompt_denoising={"enabled": True, "threshold": 1.0, "keep_all_if_none_pass": False},
                         key_smoothing={"enabled": True, "threshold": 1.0})
    sd = {k: v.detach() for k, v in ref_t.clip.visual.state_dict().items()}
    ref = ref_inference(sd, normalised(ref_t, arr), ref_t.classifier.float(), ref_cfg(ref_t, 1.0, 1.0), orig)
    (sm,) = ref_t.score_maps(b)
    assert (ref_t.seg_logits(sm) - ref).abs().max() < TOL
    keep = make_teacher(prompt_denoising={"enabled": True, "threshold": 1.0},
                        key_smoothing={"enabled": True, "threshold": 1.0})
    (sm2,) = keep.score_maps(b)
    assert (sm2.logits - sm.logits).abs().max() > 1e-3  # nothing was dropped


@pytest.mark.parametrize("size,orig,crop,stride", [
    ((80, 120), (100, 150), 64, 32),    # several windows each way, stride not a patch multiple below
    ((80, 120), (100, 150), 64, 40),
    ((48, 70), (96, 140), 64, 32),      # shorter than the crop: a smaller window, as mmseg
])
def test_slide_mode_matches_reference(size, orig, crop, stride):
    t = make_teacher(mode="slide", slide_short_side=size[0], slide_max_long_side=1000, slide_crop=crop,
                     slide_stride=stride, prompt_denoising={"enabled": True, "threshold": 0.9},
                     key_smoothing={"enabled": True, "threshold": 1.0})
    sd = {k: v.detach() for k, v in t.clip.visual.state_dict().items()}
    arr = photo(size[1], size[0], 21)
    b = batch_of([arr], [orig])
    (sm,) = t.score_maps(b)
    assert sm.work_hw == size
    ref = ref_inference(sd, normalised(t, arr), t.classifier.float(), ref_cfg(t, 0.9, 1.0), orig,
                        slide=(crop, stride))
    assert (t.seg_logits(sm) - ref).abs().max() < TOL
    (out,) = t.predict(b, {})
    check_argmax(out.labels, ref)


def test_batching_does_not_change_results():
    t = make_teacher()
    images, origs = [photo(85, 64, 31), photo(64, 64, 32), photo(64, 100, 33)], [(64, 85), (64, 64), (100, 64)]
    together = t.score_maps(batch_of(images, origs))
    for i in range(3):
        (alone,) = t.score_maps(batch_of([images[i]], [origs[i]]))
        assert (alone.logits - together[i].logits).abs().max() < 1e-5


def test_default_sizes_are_the_papers():
    cfg = MaskCLIPConfig(type="maskclip")
    assert (cfg.image_size, cfg.whole_max_long_side) == (512, 2048)  # COCO-Stuff: Resize (2048, 512)
    assert cfg.key_smoothing.rule == "reference" and cfg.key_smoothing.threshold == 1.0
    assert cfg.prompt_denoising.threshold == 0.5
    assert cfg.candidate_topk == 0 and cfg.label_resolution == 0
