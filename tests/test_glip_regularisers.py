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
