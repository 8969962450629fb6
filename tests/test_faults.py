"""Every bad input and fault ends in one line and a documented exit code, with nothing left behind (issue 20).

Cheap checks come first: the input listing, the output and the writer lock are checked before any weights
resolve or Ray starts.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from helpers import TINY_CLIP, make_shards, one_line, run_config, tiny_maskclip, write_config
from s3server import s3_endpoint  # noqa: F401  (fixture)
from labelmill.cli import main
from labelmill.exitcodes import (
    EXIT_CONFIG, EXIT_ERROR, EXIT_INPUT, EXIT_LOCK_HELD, EXIT_OUTPUT, EXIT_PIPE_CLOSED, EXIT_WEIGHTS, MEANING,
    classify,
)

# ------------------------------------------------------------------ cheap checks first
def test_a_second_writer_is_refused_before_weights_resolve(tmp_path, capsys, no_ray):
    """The lock is checked before the weights: a held lock wins over a missing weights file."""
    from labelmill.store.lock import OutputLock

    make_shards(tmp_path / "in", 1, 2)
    out = tmp_path / "out"
    cfg = run_config(str(tmp_path / "in"), str(out), teachers=[tiny_maskclip(pretrained=str(tmp_path / "no.pt"),
                                                                              quick_gelu=True)],
                     allow_random_init=False)
    path = write_config(tmp_path, cfg)
    with OutputLock(str(out), command="test", heartbeat_s=0):
        assert main(["run", path]) == EXIT_LOCK_HELD
        one_line(capsys, "labelmill: lock held:")
    assert main(["run", path]) == EXIT_WEIGHTS  # free: now the weights are checked (and nothing is left)
    one_line(capsys, "labelmill: weights error:")
    assert not (out / "_labelmill" / "config.json").exists()


def test_refresh_with_a_bad_input_leaves_nothing(tmp_path, capsys, no_ray):
    out = tmp_path / "out"
    assert main(["refresh", write_config(tmp_path, run_config(str(tmp_path / "nowhere"), str(out))), "--json"]) == EXIT_INPUT
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip())["exit_code"] == EXIT_INPUT
    assert not out.exists()  # no _labelmill/ (config.json, lock) left behind


def test_an_unreachable_hub_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    """No retries against a hub that cannot answer: one TCP probe, then the error."""
    from labelmill.teachers.configs import MaskCLIPConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = MaskCLIPConfig(type="maskclip", model="ViT-B-32", pretrained="openai")
    from labelmill.models.common import WeightsError

    with pytest.raises(WeightsError, match="127.0.0.1:9 cannot be reached") as info:
        cfg.preflight(allow_random_init=False)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set"):
        cfg.preflight(allow_random_init=False)


# ------------------------------------------------------------------ one line for each error
def test_reading_commands_with_json_print_the_error_as_json(tmp_path, capsys):
    for argv in (["versions", str(tmp_path / "none"), "--json"], ["diff", str(tmp_path / "none"), "1", "2", "--json"],
                 ["rollback", str(tmp_path / "none"), "1", "--json"], ["vacuum", str(tmp_path / "none"), "--keep-versions", "1", "--json"]):
        code = main(argv)
        captured = capsys.readouterr()
        assert code == EXIT_INPUT, argv
        line = json.loads(captured.out.strip().splitlines()[-1])
        assert line["exit_code"] == EXIT_INPUT and line["command"] == argv[0] and "does not exist" in line["error"]
        assert len(captured.err.strip().splitlines()) == 1


def test_eval_given_a_file_is_one_line(tmp_path, capsys):
    make_shards(tmp_path / "in", 1, 2)
    (tmp_path / "model.safetensors").write_bytes(b"not a folder")
    out = tmp_path / "out"
    from labelmill.config import load_config
    from labelmill.store.commit import OutputStore

    cfg = load_config(run_config(str(tmp_path / "in"), str(out)))
    OutputStore(str(out)).claim(cfg.model_dump(mode="json"), cfg.label_hash())
    os.makedirs(out / "labels", exist_ok=True)
    code = main(["eval", str(tmp_path / "model.safetensors"), str(out)])
    assert code in (EXIT_INPUT, EXIT_WEIGHTS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err


def test_a_closed_pipe_ends_quietly(tmp_path, capsys, monkeypatch):
    """``labelmill ... | head``: the reader left; no BrokenPipeError traceback, the shell's SIGPIPE code."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))

    class GoneReader:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def fileno(self):
            raise ValueError("no descriptor")

    monkeypatch.setattr(sys, "stdout", GoneReader())
    assert main(["convert-weights", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == \
        EXIT_PIPE_CLOSED
    assert capsys.readouterr().err == ""


def test_classify_is_the_one_mapping(tmp_path):
    """Known errors map by class name along the MRO (no import needed), through Ray's wrappers."""
    from labelmill.config import ConfigError
    from labelmill.io.shards import ShardListError
    from labelmill.store.lock import LockHeld

    assert classify(ConfigError("x")) == (EXIT_CONFIG, "config error: x")
    assert classify(ShardListError("gone"))[0] == EXIT_INPUT
    assert classify(LockHeld("busy"))[0] == EXIT_LOCK_HELD
    assert classify(FileExistsError("there"))[0] == EXIT_OUTPUT
    assert classify(BrokenPipeError())[0] == EXIT_PIPE_CLOSED
    assert classify(KeyError("a bug")) is None  # a bug keeps its traceback

    class RayTaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the worker's error in .cause
        def __init__(self, cause):
            super().__init__("task failed:\n  Traceback ...\n  many lines")
            self.cause = cause

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.parquet"))
    code, line = classify(RayTaskError(full))
    assert code == EXIT_ERROR and "no space left on device" in line and "\n" not in line
    for code in (EXIT_CONFIG, EXIT_ERROR, EXIT_INPUT, EXIT_LOCK_HELD, EXIT_OUTPUT, EXIT_PIPE_CLOSED, EXIT_WEIGHTS):
        assert code in MEANING


def test_disk_full_releases_the_lock(tmp_path, monkeypatch):
    """Releasing the lock when no space is left drops the record (which needs no space) and never raises."""
    from labelmill.store.lock import OutputLock, read_lock

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an output that existed before")
    lock = OutputLock(str(tmp_path / "out"), command="run", heartbeat_s=0).acquire()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock, "_overwrite", full)
    lock.release()
    again = OutputLock(str(tmp_path / "out"), command="run", heartbeat_s=0).acquire()  # free at once
    again.release()
    assert read_lock(str(tmp_path / "out"))["released"]


def test_s3_without_credentials_is_one_line(tmp_path, capsys, no_ray, monkeypatch, s3_endpoint):
    """Input and output on s3:// with no credentials anywhere: one line each, nothing written."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    make_shards(tmp_path / "in", 1, 1)
    opts = {"endpoint_url": s3_endpoint}
    cfg = run_config("s3://data/shards/", str(tmp_path / "out"))
    cfg["input"]["storage_options"] = opts
    assert main(["run", write_config(tmp_path, cfg)]) == EXIT_INPUT
    assert "no usable credentials" in one_line(capsys, "labelmill: input error: cannot list")
    cfg = run_config(str(tmp_path / "in"), "s3://data/out")
    cfg["output"]["storage_options"] = opts
    assert main(["run", write_config(tmp_path, cfg)]) == EXIT_OUTPUT
    assert "no usable credentials" in one_line(capsys, "labelmill: output error: cannot reach output")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ smaller fidelity points
def test_quick_gelu_false_against_a_quickgelu_architecture_is_a_config_error(tmp_path, capsys, no_ray):
    make_shards(tmp_path / "in", 1, 1)
    cfg = run_config(str(tmp_path / "in"), str(tmp_path / "out"),
                     teachers=[{**tiny_maskclip(), "arch_config": None, "model": "ViT-B-32-quickgelu",
                                "pretrained": str(tmp_path / "w.safetensors"), "quick_gelu": False}])
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert main(["run", write_config(tmp_path, cfg)]) == EXIT_WEIGHTS
    assert "conflicts with 'ViT-B-32-quickgelu'" in one_line(capsys, "labelmill: weights error:")


def test_decoder_and_teacher_round_sizes_alike():
    from labelmill.io.images import decode_image, scaled_side
    from labelmill.models.openclip import fit_size
    from labelmill.schemas.records import ImageRequest

    from helpers import encode, photo

    assert scaled_side(5, 0.5) == 3 and round(5 * 0.5) == 2  # half up, not half to even
    for w, h in ((1003, 300), (451, 130), (333, 1001)):
        req = ImageRequest(short_side=100, max_long_side=10_000)
        got = decode_image(encode(photo(w, h, seed=1)), req, 10**9).pixels.shape[:2]
        assert tuple(got) == fit_size(h, w, 100, 10_000), (w, h)


def test_vild_at_original_resolution_keeps_a_bounded_budget(tmp_path):
    from labelmill.config import load_config
    from labelmill.pipelines.label import build_pipeline

    cfg = load_config(run_config(str(tmp_path), str(tmp_path / "out"), teachers=[
        {"type": "vild", "pretrained": None, "arch_config": TINY_CLIP, "work_short_side": None,
         "work_max_long_side": None}]))
    assert build_pipeline(cfg).find(name="prepare").bytes_per_row() == 2048 * 2048 * 3


def test_version_flag_and_a_null_teacher_type(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("labelmill ")
    cfg = run_config(str(tmp_path), str(tmp_path / "out"), teachers=[{"type": None}])
    assert main(["run", write_config(tmp_path, cfg), "--dry-run"]) == EXIT_CONFIG
    assert 'write type: "null"' in one_line(capsys, "labelmill: config error:")
