"""State-dict naming: official key evidence, prefix mapping, save/load round trips."""

import gzip
import re
import json
from pathlib import Path

import pytest
import torch

from labelmill.models.glip import (
    GLIP,
    CheckpointError,
    GLIPConfig,
    load_glip_weights,
    save_glip_weights,
    to_checkpoint_key,
    to_model_key,
)

DATA = Path(__file__).parent / "data"


def evidence(name):
    with gzip.open(DATA / f"{name}_state_dict_keys.json.gz", "rt", encoding="utf-8") as f:
        return {k: (tuple(shape), dtype) for k, shape, dtype in json.load(f)["keys"]}


def ours(model):
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, factory", [("glip_t", GLIPConfig.glip_t), ("glip_l", GLIPConfig.glip_l)])
def test_full_size_keys_and_shapes_match_official(name, factory):
    expected = evidence(name)
    got = ours(GLIP(factory()))
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(expected) == {"glip_t": 746, "glip_l": 1022}[name]


def test_tiny_config_uses_the_same_naming_scheme():
    def scheme(keys):
        return {re.sub(r"\.\d+(?=\.|$)", ".#", k) for k in keys}

    assert scheme(GLIP(GLIPConfig.tiny()).state_dict()) == scheme(evidence("glip_t"))


def test_key_mapping_round_trip():
    key = "rpn.head.dyhead_tower.0.b_attn.gamma_v"
    assert to_checkpoint_key(key) == "module." + key
    assert to_model_key(to_checkpoint_key(key)) == key
    assert to_model_key(key) == key
    assert to_checkpoint_key("module." + key) == "module." + key
    assert to_checkpoint_key(key, data_parallel=False) == key


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    a = GLIP(GLIPConfig.tiny()).eval()
    torch.manual_seed(1)
    b = GLIP(GLIPConfig.tiny()).eval()
    return a, b


def forward(model):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(1, 3, 96, 128, generator=g)
    ids = torch.tensor([[2, 5, 29, 87, 3]])
    out = model(images, ids, torch.ones_like(ids))
    return torch.cat([t.flatten() for t in out.token_logits + out.box_deltas + out.centerness])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_round_trip_with_module_prefix(tmp_path, tiny_pair, suffix):
    a, b = tiny_pair
    path = tmp_path / f"tiny{suffix}"
    save_glip_weights(a, path)
    if suffix == ".pth":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"model"} and all(k.startswith("module.") for k in raw["model"])
    fresh = GLIP(GLIPConfig.tiny()).eval()
    with torch.no_grad():
        assert not torch.equal(forward(fresh), forward(a))
        report = load_glip_weights(fresh, path)
        assert report.missing == [] and report.unexpected == [] and report.regenerated == []
        assert report.loaded == len(a.state_dict())
        assert torch.equal(forward(fresh), forward(a))
    assert not torch.equal(forward(b), forward(a))


def test_strict_loading_reports_problems(tmp_path, tiny_pair):
    a, _ = tiny_pair
    state = {to_checkpoint_key(k): v for k, v in a.state_dict().items()}
    del state["module.language_backbone.body.model.embeddings.position_ids"]  # regenerable
    state["module.language_backbone.body.model.pooler.dense.bias"] = torch.zeros(32)
    state["module.language_backbone.body.model.embeddings.token_type_ids"] = torch.zeros(1, 64, dtype=torch.long)
    path = tmp_path / "extra.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), path)
    report = load_glip_weights(GLIP(GLIPConfig.tiny()), path, strict=False)
    assert report.unexpected == ["language_backbone.body.model.pooler.dense.bias"]
    assert report.regenerated == ["language_backbone.body.model.embeddings.position_ids"]
    assert report.ignored == ["language_backbone.body.model.embeddings.token_type_ids"]
    assert report.missing == []
    del state["module.rpn.head.bias0"]
    torch.save({"model": state}, path)
    report = load_glip_weights(GLIP(GLIPConfig.tiny()), path, strict=False)
    assert report.missing == ["rpn.head.bias0"]


def test_shape_mismatch_and_missing_file(tmp_path):
    path = tmp_path / "tiny.pth"
    save_glip_weights(GLIP(GLIPConfig.tiny()), path)
    other = GLIP(GLIPConfig.tiny().with_overrides(dyhead_layers=1, channels=16))
    with pytest.raises(CheckpointError):
        load_glip_weights(other, path)
    with pytest.raises(FileNotFoundError, match="glip_tiny_model_o365_goldg.pth"):
        load_glip_weights(other, tmp_path / "nope.pth")


def test_random_tensors_with_the_right_names_and_shapes_are_refused(tmp_path):
    """Names and shapes alone are not enough: dtypes and the formula-given buffers are checked."""
    own = GLIP(GLIPConfig.tiny()).state_dict()
    g = torch.Generator().manual_seed(0)
    noise = {to_checkpoint_key(k): torch.randn(v.shape, generator=g) for k, v in own.items()}
    path = tmp_path / "noise.pth"
    torch.save({"model": noise}, path)
    with pytest.raises(CheckpointError, match="(?s)dtype mismatch.*relative_position_index"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), path)
    # right dtypes, wrong deterministic values
    forged = {to_checkpoint_key(k): (torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
              for k, v in own.items()}
    index = next(k for k in forged if k.endswith("relative_position_index"))
    forged[index] = forged[index].flip(0)
    torch.save({"model": forged}, path)
    with pytest.raises(CheckpointError, match="differ from their formulas.*relative_position_index"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), path)
    forged[index] = own[to_model_key(index)]
    anchor = next(k for k in forged if "cell_anchors" in k)
    torch.save({"model": forged}, path)
    with pytest.raises(CheckpointError, match="cell_anchors"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), path)
    for k in forged:
        if "cell_anchors" in k:
            forged[k] = own[to_model_key(k)]
    torch.save({"model": forged}, path)
    assert load_glip_weights(GLIP(GLIPConfig.tiny()), path).clean  # only the learned weights are random


def test_npz_with_object_arrays_gets_a_clear_error(tmp_path):
    import numpy as np

    path = tmp_path / "weights.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="object arrays"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), path)
    ok = tmp_path / "numeric.npz"
    np.savez(ok, **{to_checkpoint_key(k): v.numpy() for k, v in GLIP(GLIPConfig.tiny()).state_dict().items()})
    assert load_glip_weights(GLIP(GLIPConfig.tiny()), ok).clean
