"""The MaskCLIP+ student as published: the ResNet backbone from ImageNet weights loaded strictly (or random only
when asked), MaskCLIP+'s dot-product logits, an ignore value no class id can take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from labelmill.models.common import WeightsError
from labelmill.models.deeplab import NORMALIZATION, SegStudent, StudentSpec, read_spec, save_student


def _resnet50_state() -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    return {k: v.clone() for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}


def test_backbone_weights_load_strictly_and_a_mismatch_names_the_keys(tmp_path):
    state = _resnet50_state()
    good = tmp_path / "resnet50.pt"
    torch.save(state, good)
    spec = StudentSpec(backbone="resnet50", vocabulary=["a", "b"], embed_dim=8, normalization="imagenet")
    model = SegStudent(spec, backbone_weights=str(good))
    assert torch.equal(model.backbone.layers[3][2].conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(model.backbone.stem[1].running_mean, state["bn1.running_mean"])
    assert torch.allclose(model.mean.flatten(), torch.tensor(NORMALIZATION["imagenet"][0]))
    # a file for another network: refused, with the keys named (it used to load silently with strict=False)
    bad = dict(state)
    bad.pop("layer4.2.conv3.weight")
    bad["head.extra.weight"] = torch.zeros(3)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as err:
        SegStudent(spec, backbone_weights=str(path))
    text = str(err.value)
    assert "missing ['layer4.2.conv3.weight']" in text and "unexpected ['head.extra.weight']" in text
    assert "other shapes ['conv1.weight']" in text and "\n" not in text


def test_resnet_without_weights_needs_random_init_said():
    from labelmill.config import ConfigError
    from labelmill.training.config import load_train_config

    base = {"data": {"output": "x"}, "checkpoint": {"path": "r"}}
    with pytest.raises(ConfigError, match="model.backbone_weights is required for resnet101"):
        load_train_config("maskclip-plus", base)
    cfg = load_train_config("maskclip-plus", {**base, "model": {"random_init": True}})
    assert cfg.model.backbone == "resnet101" and cfg.model.logits == "dot"  # MaskCLIP+'s head by default
    assert load_train_config("maskclip-plus", {**base, "model": {"backbone": "tiny"}}).model.random_init is False


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_logits_dot_is_maskclip_plus_head_and_cosine_keeps_the_old_one(mode, tmp_path):
    torch.manual_seed(0)
    emb = torch.randn(5, 16)
    spec = StudentSpec(backbone="tiny", vocabulary=list("abcde"), embed_dim=16, logits=mode, logit_scale=50.0)
    model = SegStudent(spec, emb).eval()
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        got = model(images)
        x = (images - model.mean) / model.std
        feats = model.head(model.backbone(x))
        text = F.normalize(emb, dim=-1)[:, :, None, None]
        raw = F.conv2d(feats, text) if mode == "dot" else F.conv2d(F.normalize(feats, dim=1), text) * 50.0
        want = F.interpolate(raw, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(got, want, atol=1e-5)
    save_student(model, str(tmp_path / "ck"))  # the mode travels with the checkpoint
    assert read_spec(str(tmp_path / "ck"))[0].logits == mode


def test_a_vocabulary_of_300_classes_trains_every_class_including_255():
    from labelmill.training.targets import IGNORE, class_map

    assert IGNORE < 0
    h, w = 8, 8
    masks = []
    for cid, (r0, r1) in ((255, (0, 4)), (299, (4, 8))):
        m = np.zeros((h, w), np.uint8)
        m[r0:r1, :4] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        masks.append({"class_id": cid, "score": 0.9, "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    target = torch.as_tensor(class_map(masks, h, w))
    assert (target[:4, :4] == 255).all() and (target[4:, :4] == 299).all() and (target[:, 4:] == IGNORE).all()
    logits = torch.zeros(1, 300, h, w, requires_grad=True)
    F.cross_entropy(logits, target[None], ignore_index=IGNORE).backward()
    # class 255's pixels are trained (pushed up), the unlabelled ones are not
    assert (logits.grad[0, 255, :4, :4] < 0).all() and (logits.grad[0, :, :, 4:] == 0).all()
