"""No code from a weights file ever runs: TorchScript and pickle payloads on every load path.

Each payload writes a marker file when the file is loaded the unsafe way
(``torch.jit.load`` / ``torch.load(weights_only=False)``); the fixtures check
that it does, so every "no marker" assertion below can fail.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from helpers import TINY_CLIP, tiny_maskclip
from labelmill.cli import main
from labelmill.models.common import WeightsError
from labelmill.models.safe_load import (
    UnsafeWeightsError,
    check_finite,
    check_readable,
    convert_weights,
    read_tensors,
    read_torchscript,
)


class _Payload(nn.Module):
    """Writes ``path`` from its TorchScript ``__setstate__``, i.e. when the archive is loaded."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.seed = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.seed, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        self.path = state[1]
        self.training = state[2]
        written = torch.from_file(self.path, True, 8, dtype=torch.uint8)
        written.fill_(33)
        self.seed = state[0] + written[0:1].float() * 0.0


def _scripted_clip_with_payload(marker: Path, dest: Path):
    import open_clip

    from labelmill.models.openclip import register_arch

    torch.manual_seed(3)
    model = open_clip.create_model(register_arch(TINY_CLIP), pretrained=None, force_quick_gelu=True).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_module("payload", _Payload(str(marker)))
    torch.jit.script(model).save(str(dest))
    return reference


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("payloads")
    marker = root / "PWNED"
    ts = root / "clip_payload.pt"
    reference = _scripted_clip_with_payload(marker, ts)
    # the payload works: loading the archive the unsafe way writes the marker
    torch.jit.load(str(ts))
    assert marker.exists()
    marker.unlink()
    pk = root / "pickle_payload.pt"
    torch.save({"model": {"w": torch.ones(2)}, "evil": _Evil(str(marker))}, pk)
    torch.load(pk, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return {"marker": marker, "torchscript": ts, "pickle": pk, "reference": reference}


@pytest.fixture(autouse=True)
def _no_marker_left(request):
    yield
    if "payloads" in request.fixturenames:
        marker = request.getfixturevalue("payloads")["marker"]
        assert not marker.exists(), "a payload ran"


# ----------------------------------------------------------------- the reader
def test_torchscript_tensors_read_without_running_code(payloads):
    state = read_torchscript(payloads["torchscript"])
    ref = payloads["reference"]
    assert set(ref) <= set(state)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    # what torch.jit.load(...).state_dict() gives, minus the payload's own parameter (its state has no names)
    assert set(state) - set(ref) <= {k for k in state if k.endswith("attn_mask")}
    check_readable(payloads["torchscript"])


def test_torchscript_pickle_naming_other_globals_is_refused(tmp_path, payloads):
    evil = tmp_path / "evil_ts.pt"
    data = pickle.dumps(_Evil(str(payloads["marker"])), protocol=2)
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/version", "3\n")
    for call in (read_tensors, check_readable):
        with pytest.raises(UnsafeWeightsError, match=r"names io\.open.*convert-weights"):
            call(evil)


def test_pickle_payload_refused_in_one_line(payloads):
    with pytest.raises(UnsafeWeightsError) as info:
        read_tensors(payloads["pickle"])
    message = str(info.value)
    assert "\n" not in message and "convert-weights" in message and "--trust-source" in message
    with pytest.raises(UnsafeWeightsError):
        check_readable(payloads["pickle"])


def test_non_finite_weights_name_the_tensor(tmp_path):
    state = {"ok": torch.ones(3), "layer.bad": torch.tensor([1.0, float("nan")])}
    with pytest.raises(WeightsError, match="'layer.bad'"):
        check_finite(state, "x.pt")
    check_finite({"ok": torch.ones(3), "ints": torch.arange(3)}, "x.pt")


# ------------------------------------------------------------- CLIP teachers
def test_clip_load_paths(payloads, tmp_path):
    from labelmill.models.openclip import load_clip

    model, weights, _ = load_clip("ignored", str(payloads["torchscript"]), arch_config=TINY_CLIP)
    ref = payloads["reference"]
    got = model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert weights.sha256 != "random-init"
    with pytest.raises(UnsafeWeightsError, match="convert-weights"):
        load_clip("ignored", str(payloads["pickle"]), arch_config=TINY_CLIP, quick_gelu=True)
    nan = {k: v.clone() for k, v in ref.items()}
    nan["visual.proj"][0, 0] = float("inf")
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(WeightsError, match="'visual.proj'"):
        load_clip("ignored", str(tmp_path / "nan.pt"), arch_config=TINY_CLIP, quick_gelu=True)


def test_maskclip_teacher_and_preflight(payloads):
    from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher

    good = MaskCLIPConfig(**tiny_maskclip(pretrained=str(payloads["torchscript"])))
    good.preflight(allow_random_init=False)
    teacher = MaskCLIPTeacher(good, torch.device("cpu"))
    assert teacher.provenance().weights_sha256 != "random-init"
    bad = MaskCLIPConfig(**tiny_maskclip(pretrained=str(payloads["pickle"]), quick_gelu=True))
    with pytest.raises(UnsafeWeightsError):
        bad.preflight(allow_random_init=False)
    with pytest.raises(UnsafeWeightsError):
        MaskCLIPTeacher(bad, torch.device("cpu"))


# ------------------------------------------------------------------ GLIP
def test_glip_teacher_preflight_and_checkpoint(payloads, tmp_path):
    from labelmill.models.glip import GLIP, GLIPConfig, CheckpointError, load_glip_weights
    from labelmill.teachers.glip import GLIPTeacherConfig

    for payload in ("pickle", "torchscript"):
        cfg = GLIPTeacherConfig(type="glip", weights=str(payloads[payload]), tokenizer="bert-base-uncased",
                                architecture="tiny")
        if payload == "pickle":
            with pytest.raises(UnsafeWeightsError):
                cfg.preflight(allow_random_init=False)
        with pytest.raises(CheckpointError):
            load_glip_weights(GLIP(GLIPConfig.tiny()), payloads[payload])
    state = {k: v.clone() for k, v in GLIP(GLIPConfig.tiny()).state_dict().items()}
    state["backbone.body.patch_embed.proj.weight"].fill_(float("nan"))
    torch.save({"model": state}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="'backbone.body.patch_embed.proj.weight'"):
        load_glip_weights(GLIP(GLIPConfig.tiny()), tmp_path / "nan.pth")


# ------------------------------------------------------- students, training
def test_student_teacher_and_training_init(payloads, tmp_path):
    from labelmill.models.deeplab import META_FILE, MODEL_FILE, StudentCheckpointError, load_student
    from labelmill.teachers.student import StudentTeacher, StudentTeacherConfig
    from labelmill.training.errors import CheckpointError, readable_or_raise

    for payload in ("pickle", "torchscript"):
        folder = tmp_path / payload
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(payloads[payload].read_bytes())
        (folder / META_FILE).write_text(json.dumps({"backbone": "tiny", "vocabulary": ["a", "b"], "embed_dim": 8}))
        cfg = StudentTeacherConfig(type="student", checkpoint=str(folder))
        if payload == "pickle":
            with pytest.raises(UnsafeWeightsError):
                cfg.preflight(allow_random_init=False)
            with pytest.raises(CheckpointError, match="convert-weights"):
                readable_or_raise(str(payloads[payload]))  # training's init_from / backbone_weights check
        with pytest.raises(StudentCheckpointError):
            load_student(str(folder))  # the archive's CLIP tensors read safely, and do not fit a student
        with pytest.raises(WeightsError):
            StudentTeacher(cfg, torch.device("cpu"))


def test_training_config_refuses_allow_unsafe_pickle(tmp_path):
    from labelmill.config import ConfigError
    from labelmill.training.config import load_train_config

    path = tmp_path / "glip.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"output": str(tmp_path)}, "checkpoint": {"path": str(tmp_path / "runs")},
        "model": {"tokenizer": "builtin-test", "allow_unsafe_pickle": True}}))
    with pytest.raises(ConfigError, match="allow_unsafe_pickle.*convert-weights"):
        load_train_config("glip", str(path), [])


# --------------------------------------------------------- convert-weights
def test_convert_weights(payloads, tmp_path, capsys):
    marker = payloads["marker"]
    out = tmp_path / "clip.safetensors"
    # untrusted: refused in one line, nothing written
    assert main(["convert-weights", str(payloads["pickle"]), str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--trust-source" in err and not out.exists() and not marker.exists()
    # a TorchScript archive reads safely: no flag needed, and its code never runs
    assert main(["convert-weights", str(payloads["torchscript"]), str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ran_code_from_source"] is False and not marker.exists()
    state = read_tensors(out)
    assert all(torch.equal(state[k], v) for k, v in payloads["reference"].items())
    # DST exists: an output error
    assert main(["convert-weights", str(payloads["torchscript"]), str(out)]) == 5
    # trusted: the file's code runs (that is what the flag says), the result is plain tensors
    plain = tmp_path / "plain.pt"
    assert main(["convert-weights", str(payloads["pickle"]), str(plain), "--trust-source"]) == 0
    assert marker.exists()
    marker.unlink()
    assert set(torch.load(plain, weights_only=True)) == {"w"}


def test_no_unsafe_loader_outside_convert_weights():
    """torch.jit.load and weights_only=False appear only in convert-weights' trusted reader."""
    root = Path(__file__).resolve().parents[1]
    hits = []
    for folder in ("labelmill", "models", "teachers", "training", "stages", "pipelines", "schemas"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("jit.load(", "weights_only=False", "allow_pickle=True", "pickle.load(", "pickle.loads("):
                if needle in text:
                    hits.append(f"{path.relative_to(root)}: {needle}")
    assert sorted(hits) == ["models/safe_load.py: jit.load(", "models/safe_load.py: weights_only=False"]
