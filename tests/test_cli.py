"""The command line: help everywhere, exit codes and messages for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import run_config
from labelmill.cli import EXIT_CONFIG, EXIT_INPUT, EXIT_WEIGHTS, main


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "labelmill", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["export-coco"], ["report"]])
def test_help_on_every_command(command):
    res = cli(*command, "--help")
    assert res.returncode == 0 and "usage: labelmill" in res.stdout


def test_config_errors_before_any_work(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    cfg = run_config(str(tmp_path / "none"), str(tmp_path / "out"))
    cfg["teachers"][0]["imge_size"] = 3
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "teachers.0.imge_size: unknown key" in err
    assert not (tmp_path / "out").exists()


def test_missing_weights_are_an_error_that_says_how_to_fix(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    cfg = run_config(str(tmp_path), str(tmp_path / "out"))
    cfg["allow_random_init"] = False
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == EXIT_WEIGHTS
    err = capsys.readouterr().err
    assert "no weights given" in err and "pretrained" in err and "demo" in err
    cfg["teachers"] = [{"type": "maskclip", "model": "ViT-B-32", "pretrained": str(tmp_path / "missing.pt")}]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == EXIT_WEIGHTS
    assert "missing.pt" in capsys.readouterr().err


def test_no_input_shards(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(str(tmp_path / "nothing-*.tar"), str(tmp_path / "out"))))
    assert main(["run", str(path)]) == EXIT_INPUT
    assert "matches no shard" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(str(tmp_path), str(tmp_path / "out"))))
    assert main(["run", str(path), "--dry-run", "filter.min_score=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["filter"]["min_score"] == 0.25 and printed["teachers"][0]["vocabulary"][0] == "cat"
