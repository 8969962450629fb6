"""GLIP's training regularisers: defaults as GLIP's configs, active in training, the identity in eval."""

from __future__ import annotations

import pytest
import torch


def test_defaults_follow_glips_configs_and_evaluation_builds_none():
    from labelmill.training.config import GLIPModel
    from labelmill.training.glip import glip_config

    large = glip_config(GLIPModel(preset="glip_l", tokenizer="t"))
    assert large.swin.drop_path_rate == 0.4 and large.fpn_drop_block_prob == 0.3 and large.fpn_drop_block_size == 3
    assert large.fusion_dropout == 0.1 and large.head_text_dropout == 0.1
    assert glip_config(GLIPModel(preset="glip_t", tokenizer="t")).swin.drop_path_rate == 0.2
    mine = glip_config(GLIPModel(preset="glip_t", tokenizer="t", drop_path_rate=0.05, fusion_dropout=0.0))
    assert mine.swin.drop_path_rate == 0.05 and mine.fusion_dropout == 0.0
    plain = glip_config(GLIPModel(preset="glip_l", tokenizer="t"), training=False)
    assert (plain.swin.drop_path_rate, plain.fpn_drop_block_prob, plain.fusion_dropout, plain.head_text_dropout) == (
        0.0, 0.0, 0.0, 0.0)


def _pair():
    from labelmill.models.glip import GLIP, GLIPConfig

    base = GLIPConfig.tiny()
    from dataclasses import replace

    heavy = base.with_overrides(swin=replace(base.swin, drop_path_rate=0.5), fpn_drop_block_prob=0.5,
                                fusion_dropout=0.5, head_text_dropout=0.5)
    torch.manual_seed(0)
    a = GLIP(base)
    b = GLIP(heavy)
    b.load_state_dict(a.state_dict())  # the regularisers add no weights: one state dict fits both
    return a, b


def test_regularisers_are_off_in_eval_and_on_in_training():
    a, b = _pair()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    a.eval()
    b.eval()
    with torch.no_grad():
        oa, ob = a(images, ids, mask), b(images, ids, mask)
    for x, y in zip(oa.token_logits + oa.box_deltas, ob.token_logits + ob.box_deltas):
        assert torch.equal(x, y)
    # training: the heavy model's image side moves (the language BERT's own dropout is switched off in both)
    for m in (a, b):
        m.train()
        for mod in m.modules():
            if type(mod).__name__ == "Dropout":
                mod.p = 0.0
    with torch.no_grad():
        torch.manual_seed(2)
        ta = a(images, ids, mask)
        torch.manual_seed(2)
        tb = b(images, ids, mask)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ta.box_deltas, oa.box_deltas))  # a: nothing random
    assert not all(torch.allclose(x, y, atol=1e-3) for x, y in zip(tb.box_deltas, ob.box_deltas))


def test_drop_path_and_drop_block():
    from labelmill.models.glip.regularise import DropBlock2D, DropPath

    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2, 2)
    dp = DropPath(0.25).train()
    y = dp(x)
    per_sample = y.flatten(1)
    values = per_sample.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(4 / 3)
    assert (per_sample == 0).all(1).float().mean().item() == pytest.approx(0.25, abs=0.03)  # whole samples
    assert torch.equal(DropPath(0.25).eval()(x), x)
    db = DropBlock2D(0.3, 3).train()
    z = db(torch.ones(8, 4, 40, 40))
    dropped = (z == 0).float()
    assert dropped.mean().item() == pytest.approx(0.3, abs=0.08)
    assert torch.equal(dropped[:, 0], dropped[:, 3])  # the same blocks in every channel
    assert z.mean().item() == pytest.approx(1.0, abs=1e-4)  # rescaled to keep the mean
    assert torch.equal(DropBlock2D(0.3, 3).eval()(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


# ------------------------------------------------------------ recipe
def test_glip_recipe_defaults_are_glips_and_a_configs_keys_win():
    from labelmill.training.config import load_train_config

    base = {"data": {"output": "x"}, "checkpoint": {"path": "r"}, "model": {"tokenizer": "t"}}
    cfg = load_train_config("glip", base)  # glip_l
    o = cfg.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.schedule, o.warmup_steps, o.grad_clip, o.ema) == (
        "adamw", 1e-4, 0.01, "multistep", 2000, 1.0, 0.999)
    assert cfg.data.threshold == 0.5 and cfg.model.language_lr_scale == 0.1
    t = load_train_config("glip", {**base, "model": {"tokenizer": "t", "preset": "glip_t"}})
    assert t.optim.weight_decay == 1e-4  # GLIP-T's config
    mine = load_train_config("glip", base, ["optim.ema=null", "data.threshold=0.3", "optim.lr=0.001"])
    assert mine.optim.ema is None and mine.data.threshold == 0.3 and mine.optim.lr == 0.001
    assert mine.optim.warmup_steps == 2000
    seg = load_train_config("maskclip-plus", {**base, "model": {"backbone": "tiny"}})
    assert seg.optim.optimizer == "sgd" and seg.optim.ema is None  # the recipe is GLIP's only


def test_multistep_schedule_after_warmup():
    from types import SimpleNamespace

    from labelmill.training.loop import lr_factor

    o = SimpleNamespace(lr=1e-4, min_lr=0.0, schedule="multistep", warmup_steps=10, max_steps=100)
    assert lr_factor(0, o) == pytest.approx(0.1) and lr_factor(9, o) == pytest.approx(1.0)
    assert [lr_factor(s, o) for s in (50, 66, 67, 88, 89, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_weight_average_serves_the_average_and_resumes_from_the_live_weights(tmp_path):
    import os

    from labelmill.training.loop import LIVE_FILE, WeightAverage, restore_weights

    class Task:  # what the loop asks of a task: save and load a model in a folder
        def save(self, model, folder):
            torch.save(model.state_dict(), os.path.join(folder, "model.pt"))

        def load(self, model, folder):
            model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    avg.update(model)
    assert torch.allclose(avg.state["0.weight"], start["0.weight"] + 0.1)  # 0.9 * old + 0.1 * new
    assert avg.state["1.num_batches_tracked"].item() == 5  # integer buffers are copied
    live = avg.save_served(Task(), model, str(tmp_path))
    torch.save(live, tmp_path / LIVE_FILE)
    assert torch.allclose(model[0].weight, start["0.weight"] + 1.0)  # training goes on with the live weights
    served = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.allclose(served["0.weight"], start["0.weight"] + 0.1)  # a teacher loads the average
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = restore_weights(Task(), fresh, str(tmp_path))
    assert torch.allclose(fresh[0].weight, start["0.weight"] + 1.0)
    assert torch.allclose(average["0.weight"], start["0.weight"] + 0.1)
    again = WeightAverage(fresh, 0.9, average)
    assert torch.equal(again.state["0.weight"], average["0.weight"])


def test_vocabulary_prompts_name_absent_classes_as_negatives():
    import numpy as np

    from labelmill.training.targets import grounding_target

    rows = [{"bbox": [0, 0, 4, 4], "score": 0.9, "class_name": "dog"},
            {"bbox": [5, 5, 4, 4], "score": 0.9, "class_name": "cat"}]
    vocab = [f"class{i}" for i in range(200)] + ["cat", "dog"]
    t = grounding_target(rows, negatives=vocab, max_classes=85, rng=np.random.default_rng(0))
    names = [n for n in t.caption.split(". ") if n]
    assert len(names) == 85 and {"cat", "dog"} <= set(names) and len(set(names)) == 85
    assert names[:2] != ["cat", "dog"]  # shuffled
    for (s, e), row in zip((sp[0] for sp in t.tokens_positive), rows):
        assert t.caption[s:e] == row["class_name"]  # every box still points at its own class
    plain = grounding_target(rows)  # no vocabulary (caption mode, or none recorded): positives only
    assert plain.caption == "cat. dog. "
    few = grounding_target(rows, negatives=["bird", "cat"], max_classes=85)
    assert few.caption == "cat. dog. bird. "
