"""Forward shapes and numerical properties of the tiny random-init network."""

import pytest
import torch

from labelmill.models.glip import GLIP, GLIPConfig
from labelmill.models.glip.dyhead import _fit_offsets


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLIP(GLIPConfig.tiny()).eval()


def test_output_shapes(model):
    cfg = model.cfg
    images = torch.randn(2, 3, 96, 160)
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        feats = model.encode_images(images)
        out = model.predict_from_features(feats, ids, mask)
    sizes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]  # strides 8..128, P6/P7 round up
    assert [tuple(f.shape) for f in feats] == [(2, cfg.channels, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in out.box_deltas] == [(2, 4, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in out.centerness] == [(2, 1, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in out.token_logits] == [(2, h * w, 5) for h, w in sizes]
    assert [tuple(a.shape) for a in out.anchors] == [(h * w, 4) for h, w in sizes]
    assert all(torch.isfinite(t).all() for t in out.token_logits + out.box_deltas + out.centerness)
    one = out.select(1)
    assert torch.equal(one.token_logits[0][0], out.token_logits[0][1])


def test_text_padding_does_not_change_outputs(model):
    images = torch.randn(1, 3, 64, 96)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        a = model(images, ids, torch.ones_like(ids))
        b = model(images, padded, mask)
        # Sanity: the mask matters -- attending to the pad tokens changes the result.
        c = model(images, padded, torch.ones_like(padded))
    for x, y in zip(a.token_logits, b.token_logits):
        assert torch.allclose(x, y[:, :, :5], atol=1e-5)
    for x, y in zip(a.box_deltas, b.box_deltas):
        assert torch.allclose(x, y, atol=1e-5)
    assert not torch.allclose(a.box_deltas[0], c.box_deltas[0], atol=1e-5)


def test_image_padding_changes_outputs(model):
    # Why batching groups by padded shape: extra zero padding alters the real region's results.
    images = torch.randn(1, 3, 64, 96)
    ids = torch.tensor([[2, 5, 6, 3]])
    with torch.inference_mode():
        a = model(images, ids, torch.ones_like(ids))
        b = model(torch.nn.functional.pad(images, (0, 32, 0, 32)), ids, torch.ones_like(ids))
    assert not torch.allclose(a.box_deltas[0], b.box_deltas[0][:, :, :8, :12], atol=1e-4)


def test_offsets_for_coarser_level_reuse_leading_memory():
    offset = torch.arange(2 * 18 * 4 * 6, dtype=torch.float32).view(2, 18, 4, 6)
    mask = torch.arange(2 * 9 * 4 * 6, dtype=torch.float32).view(2, 9, 4, 6) + 0.5
    same_o, same_m = _fit_offsets(offset, mask, 4, 6)
    assert same_o is offset and same_m is mask
    small_o, small_m = _fit_offsets(offset, mask, 2, 3)
    assert small_o.shape == (2, 18, 2, 3) and small_m.shape == (2, 9, 2, 3)
    # Sample 1 reads the first 18*6 values of its own offsets in memory order.
    assert small_o[1].flatten().tolist() == offset[1].flatten()[: 18 * 6].tolist()
    assert small_m[0].flatten().tolist() == mask[0].flatten()[: 9 * 6].tolist()
    # An offset view cut from a wider tensor (as in the head: channels 0..17 of 27) behaves the same.
    wide = torch.randn(2, 27, 4, 6)
    view_o, _ = _fit_offsets(wide[:, :18], mask, 2, 3)
    assert torch.equal(view_o[1].flatten(), wide[1].flatten()[: 18 * 6])


def test_autocast_bfloat16_runs(model):
    images = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[2, 5, 6, 3]])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, ids, torch.ones_like(ids))
    assert all(torch.isfinite(t.float()).all() for t in out.token_logits)


def test_fused_attention_equals_the_reference_arithmetic(monkeypatch):
    """SDPA in the fusion layers (the CUDA default) gives the eager path's outputs up to float rounding."""
    import labelmill.models.glip.dyhead as dyhead

    torch.manual_seed(0)
    m = GLIP(GLIPConfig.tiny()).eval()
    x = torch.randn(2, 3, 64, 96)
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padded text must stay masked in both paths
    outs = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(dyhead, "FUSED_ATTENTION", mode)
        with torch.inference_mode():
            outs[mode] = m(x, ids, mask)
    for name in ("token_logits", "box_deltas", "centerness"):
        a, b = getattr(outs["never"], name), getattr(outs["always"], name)
        a = torch.cat([t.flatten() for t in a]) if isinstance(a, (list, tuple)) else a.flatten()
        b = torch.cat([t.flatten() for t in b]) if isinstance(b, (list, tuple)) else b.flatten()
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    assert not dyhead._fused(m.train(), x) and dyhead._fused(m.eval(), x)  # "always", eval only
    monkeypatch.setattr(dyhead, "FUSED_ATTENTION", "cuda")
    assert not dyhead._fused(m, x)  # CPU tensors keep the eager arithmetic by default
