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


# ------------------------------------------------------------ self-training and transductive labels
def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def test_gold_marks_survive_one_integer_map():
    from labelmill.training.targets import IGNORE, mark_gold, split_gold

    t = np.array([[IGNORE, 0, 5], [int(mark_gold(0)), int(mark_gold(3)), 299]])
    cls, gold = split_gold(t)
    assert cls.tolist() == [[IGNORE, 0, 5], [0, 3, 299]] and gold.tolist() == [[False] * 3, [True, True, False]]
    cls_t, gold_t = split_gold(torch.as_tensor(t))
    assert cls_t.tolist() == cls.tolist() and gold_t.tolist() == gold.tolist()


def test_self_training_relabels_only_non_gold_pixels_by_argmax_over_unseen_classes():
    """Hand-made logits, 4 classes (0, 1 seen; 2, 3 unseen), a 2 x 3 image; the published rule."""
    from labelmill.training.maskclip_plus import self_training_target
    from labelmill.training.targets import IGNORE

    logits = torch.tensor([[[[9.0, 0, 0], [0, 0, 9]],     # class 0 (seen) strongest at (0,0) and (1,2)
                            [[0, 9, 0], [0, 0, 0]],       # class 1 (seen)
                            [[1, 2, 3], [4, 0, 1]],       # class 2 (unseen)
                            [[2, 1, 5], [1, 3, 2]]]])     # class 3 (unseen)
    target = torch.tensor([[[0, IGNORE, 2], [3, 1, IGNORE]]])
    gold = torch.tensor([[[True, False, False], [False, True, False]]])
    got = self_training_target(logits, target, gold, unseen=[2, 3])
    # gold kept (0 at (0,0), 1 at (1,1)); every other pixel, the teacher's label or none: argmax over {2, 3}
    assert got.tolist() == [[[0, 2, 3], [2, 1, 3]]]
    # no seen/unseen split: argmax over all classes everywhere (no gold)
    assert self_training_target(logits, target, torch.zeros_like(gold), None).tolist() == [[[0, 1, 3], [2, 3, 0]]]
    # a threshold (not in the paper; default 0) leaves unconfident pixels unlabelled
    thr = self_training_target(logits, target, gold, unseen=[2, 3], threshold=0.9)
    assert thr[0, 0, 2].item() == IGNORE and thr[0, 0, 0].item() == 0


def test_transductive_labels_keep_unseen_teacher_labels_and_paint_gold_on_top():
    import json

    from labelmill.training.prepare import PrepareSegmentation
    from labelmill.training.targets import IGNORE, split_gold

    vocab = ["cat", "dog", "sky", "tree"]           # seen: cat, dog; unseen: sky, tree
    h, w = 4, 6
    sky = np.zeros((h, w), bool)
    sky[:2, :] = True                              # teacher: sky over the top half
    cat_t = np.zeros((h, w), bool)
    cat_t[2:, :2] = True                           # teacher: a seen class, bottom-left
    tree = np.zeros((h, w), bool)
    tree[2:, 4:] = True                            # teacher: tree, bottom-right
    rows = [{"class_id": 2, "score": 0.8, "segmentation": _rle(sky)},
            {"class_id": 0, "score": 0.8, "segmentation": _rle(cat_t)},
            {"class_id": 3, "score": 0.8, "segmentation": _rle(tree)}]
    dog = np.zeros((h, w), bool)
    dog[1:3, 2:4] = True                           # gold dog, partly over the teacher's sky
    meta = json.dumps({"annotations": [{"category": "dog", "segmentation": _rle(dog)},
                                       {"category": "sky", "segmentation": _rle(sky)}]})  # unseen gold: not used
    data = {"image_size": 8, "scale": [1.0, 1.0], "hflip": False, "augment": False, "threshold": 0.0,
            "max_image_pixels": 10**6}
    prep = PrepareSegmentation(data, {i: i for i in range(4)}, vocab, ["cat", "dog"])
    cls, gold = split_gold(prep.target(rows, meta, h, w))
    want = np.full((h, w), IGNORE)
    want[sky] = 2
    want[tree] = 3
    want[dog] = 1                                  # gold on top, nothing else blanked
    assert cls.tolist() == want.tolist() and gold.tolist() == dog.tolist()


def test_seg_task_self_trains_from_the_same_forward_pass():
    from labelmill.training.maskclip_plus import SegTask, self_training_target
    from labelmill.training.targets import IGNORE, mark_gold

    vocab = ["cat", "dog", "sky", "tree"]
    cfg = {"data": {"output": "x"}, "checkpoint": {"path": "r"}, "model": {"backbone": "tiny"},
           "self_training": {"start_step": 10}, "transductive": {"seen_classes": ["cat", "dog"]}}
    torch.manual_seed(0)
    task = SegTask(cfg, {"vocabulary": vocab, "embeddings": torch.randn(4, 16).tolist()})
    model = task.build_model()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))
    target = torch.full((2, 32, 32), IGNORE)  # two images: BatchNorm in training mode needs more than one value
    target[:, :16, :16] = mark_gold(torch.tensor(1))
    target[:, 16:, 16:] = 2
    inputs = {"image": torch.rand(2, 3, 32, 32), "target": target}
    before, _ = task.loss(model, inputs, step=9)   # before start_step: gold and pseudo-labels as given
    assert len(calls) == 1
    want = F.cross_entropy(calls[0], torch.where(target < -1, -2 - target, target), ignore_index=IGNORE)
    assert float(before.detach()) == pytest.approx(float(want), rel=1e-6)
    after, terms = task.loss(model, inputs, step=10)  # self-training: one forward, its own detached logits
    assert len(calls) == 2 and terms["self_training"] == 1.0
    gold = target < -1
    st = self_training_target(calls[1], torch.where(gold, -2 - target, target), gold, task.unseen)
    assert set(st[~gold].unique().tolist()) <= {2, 3} and (st[gold] == 1).all()
    assert float(after.detach()) == pytest.approx(float(F.cross_entropy(calls[1], st, ignore_index=IGNORE)), rel=1e-6)


# ------------------------------------------------------------ presets
def test_presets_carry_maskclip_plus_published_settings_and_own_keys_win(capsys, tmp_path):
    from labelmill.cli import main
    from labelmill.config import ConfigError
    from labelmill.training.config import load_train_config

    base = {"data": {"output": "x"}, "checkpoint": {"path": "r"}, "model": {"backbone": "tiny"}}
    cs = load_train_config("maskclip-plus", base, preset="coco-stuff")
    assert (cs.data.image_size, cs.data.img_scale, cs.data.scale) == (512, (2048, 512), (0.5, 2.0))
    assert cs.data.photometric and cs.data.pad == "mean" and cs.data.cat_max_ratio == 0.75
    assert (cs.optim.optimizer, cs.optim.lr, cs.optim.momentum, cs.optim.weight_decay) == ("sgd", 0.01, 0.9, 0.0005)
    assert (cs.optim.schedule, cs.optim.min_lr, cs.optim.max_steps, cs.optim.batch_size) == ("poly", 1e-4, 8000, 4)
    assert cs.model.logits == "dot" and cs.self_training.start_step is None  # annotation-free: no self-training
    ctx = load_train_config("maskclip-plus", base, preset="context")
    assert (ctx.data.image_size, ctx.data.img_scale, ctx.optim.max_steps) == (480, (520, 520), 4000)
    voc = load_train_config("maskclip-plus", base, ["optim.batch_size=2"], preset="zero-shot-voc")
    assert voc.self_training.start_step == voc.optim.max_steps // 10 == 2000 and voc.optim.batch_size == 2
    mine = load_train_config("maskclip-plus", {**base, "optim": {"max_steps": 50}}, preset="coco-stuff")
    assert mine.optim.max_steps == 50 and mine.optim.lr == 0.01  # a key the config gives wins; the rest stay
    import json

    import yaml

    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(base))
    assert main(["train", "maskclip-plus", str(path), "--preset", "context", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["data"]["image_size"] == 480 and shown["optim"]["max_steps"] == 4000
    with pytest.raises(ConfigError, match="unknown --preset 'coco-stuff' for glip"):
        load_train_config("glip", {"data": {"output": "x"}, "checkpoint": {"path": "r"},
                                   "model": {"tokenizer": "t"}}, preset="coco-stuff")


def test_poly_schedule_decays_to_min_lr():
    from types import SimpleNamespace

    from labelmill.training.loop import lr_factor

    optim = SimpleNamespace(lr=0.01, min_lr=1e-4, schedule="poly", warmup_steps=0, max_steps=100)
    assert lr_factor(0, optim) == pytest.approx(1.0)
    assert lr_factor(100, optim) == pytest.approx(0.01)
    assert 0.01 * lr_factor(50, optim) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)


def test_augment_resize_rule_mean_padding_photometric_and_class_ratio():
    from labelmill.training.augment import Augment, photometric_distortion
    from labelmill.training.maskclip_plus import data_section
    from labelmill.training.config import load_train_config
    from labelmill.training.targets import IGNORE

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 400, 3), dtype=np.uint8)
    aug = Augment(512, scale=(1.0, 1.0), hflip=False, img_scale=(2048, 512))
    assert aug._scale(rng, 100, 400) == pytest.approx(5.12)  # short side to 512 (long side 2048 <= 2048)
    assert Augment(480, scale=(0.5, 0.5), img_scale=(520, 520))._scale(rng, 100, 400) == pytest.approx(0.65)
    # mean-colour padding (crop larger than the resized image), targets padded with IGNORE
    small = Augment(64, scale=(1.0, 1.0), hflip=False, img_scale=(32, 32), pad_value=(124, 116, 104))
    out, tgt = small.segmentation(img[:10, :40], np.zeros((10, 40), np.int64), rng)
    assert (out[-1, -1] == [124, 116, 104]).all() and tgt[-1, -1] == IGNORE and (tgt[:8, :32] == 0).all()
    cfg = load_train_config("maskclip-plus", {"data": {"output": "x", "pad": "mean"}, "checkpoint": {"path": "r"},
                                              "model": {"random_init": True}})
    assert data_section(cfg)["pad_value"] == [124, 116, 104]  # ImageNet's mean for the ResNet
    # photometric distortion: same shape and type, another image, reproducible from the generator
    a = photometric_distortion(img, np.random.default_rng(3))
    assert a.shape == img.shape and a.dtype == np.uint8 and not np.array_equal(a, img)
    assert np.array_equal(a, photometric_distortion(img, np.random.default_rng(3)))
    # cat_max_ratio: a crop where one class is all of the labelled pixels is retried
    tgt = np.zeros((64, 256), np.int64)
    tgt[:, 192:] = 1  # class 1 only in the right quarter
    picky = Augment(64, scale=(1.0, 1.0), hflip=False, img_scale=(256, 64), cat_max_ratio=0.75)
    shares = []
    for seed in range(20):
        _, t = picky.segmentation(np.zeros((64, 256, 3), np.uint8), tgt, np.random.default_rng(seed))
        shares.append(np.bincount(t.ravel()).max() / t.size)
    plain = Augment(64, scale=(1.0, 1.0), hflip=False, img_scale=(256, 64))
    plain_shares = [np.bincount(plain.segmentation(np.zeros((64, 256, 3), np.uint8), tgt,
                                                   np.random.default_rng(seed))[1].ravel()).max() / (64 * 64)
                    for seed in range(20)]
    assert np.mean(shares) < np.mean(plain_shares) and min(shares) < 0.75


def test_transductive_labels_from_a_teacher_of_the_unseen_classes_are_the_papers():
    """Labelled with the unseen classes as its vocabulary, the teacher's masks are its argmax over the unseen
    classes everywhere; the student's classes (all four, from model.text_embeddings) map them by name."""
    import json

    from labelmill.training.maskclip_plus import class_mapping
    from labelmill.training.prepare import PrepareSegmentation
    from labelmill.training.targets import split_gold

    vocab = ["cat", "dog", "sky", "tree"]
    h, w = 4, 6
    sky = np.zeros((h, w), bool)
    sky[:2] = True
    rows = [{"class_id": 0, "score": 0.8, "segmentation": _rle(sky)},      # teacher vocabulary: [sky, tree]
            {"class_id": 1, "score": 0.8, "segmentation": _rle(~sky)}]
    mapping = class_mapping({0: "sky", 1: "tree"}, vocab)
    dog = np.zeros((h, w), bool)
    dog[1:3, 2:4] = True
    meta = json.dumps({"annotations": [{"category": "dog", "segmentation": _rle(dog)}]})
    data = {"image_size": 8, "scale": [1.0, 1.0], "hflip": False, "augment": False, "threshold": 0.0,
            "max_image_pixels": 10**6}
    cls, gold = split_gold(PrepareSegmentation(data, mapping, vocab, ["cat", "dog"]).target(rows, meta, h, w))
    want = np.where(sky, 2, 3)
    want[dog] = 1
    assert cls.tolist() == want.tolist() and gold.tolist() == dog.tolist()  # every pixel labelled, none blanked


def test_paths_a_user_types_are_resolved_on_the_driver(tmp_path, monkeypatch):
    """Ray Train's workers do not run where the command ran: every local path becomes absolute there."""
    from labelmill.training.config import load_train_config

    monkeypatch.chdir(tmp_path)
    cfg = load_train_config("maskclip-plus", {"data": {"output": "labels"}, "checkpoint": {"path": "runs"},
                                              "model": {"backbone_weights": "w/resnet101.pt",
                                                        "text_embeddings": "emb.parquet"}})
    assert cfg.data.output == str(tmp_path / "labels") and cfg.checkpoint.path == str(tmp_path / "runs")
    assert cfg.model.backbone_weights == str(tmp_path / "w" / "resnet101.pt")
    assert cfg.model.text_embeddings == str(tmp_path / "emb.parquet")
    glip = load_train_config("glip", {"data": {"output": "s3://bucket/labels"}, "checkpoint": {"path": "r"},
                                      "model": {"tokenizer": "bert"}, "gold": [{"path": "g.jsonl", "images": "img"}]})
    assert glip.data.output == "s3://bucket/labels" and glip.model.tokenizer == str(tmp_path / "bert")
    assert (glip.gold[0].path, glip.gold[0].images) == (str(tmp_path / "g.jsonl"), str(tmp_path / "img"))
