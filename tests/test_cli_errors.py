"""Bad CLI input: one clear line on stderr, the documented exit code, nothing written (issue 12, item 13)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import make_shards, one_line, run_config, write_config
from labelmill.cli import main
from labelmill.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_INPUT, EXIT_OUTPUT


@pytest.mark.parametrize("case", ["missing", "empty", "no_shards"])
def test_missing_or_empty_input_leaves_no_output(tmp_path, capsys, no_ray, case):
    folder = tmp_path / "in"
    if case != "missing":
        folder.mkdir()
    if case == "no_shards":
        (folder / "notes.txt").write_text("no tar here")
    out = tmp_path / "out"
    assert main(["run", write_config(tmp_path, run_config(str(folder), str(out)))]) == EXIT_INPUT
    assert "matches no shard" in one_line(capsys, "labelmill: input error:")
    assert not out.exists()  # no _labelmill/config.json left behind


def test_output_path_that_is_a_file(tmp_path, capsys, no_ray):
    make_shards(tmp_path / "in", 1, 1)
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    assert main(["run", write_config(tmp_path, run_config(str(tmp_path / "in"), str(out)))]) == EXIT_OUTPUT
    assert "is a file" in one_line(capsys, "labelmill: output error:")
    assert out.read_text() == "keep me"
    nested = str(out / "sub")
    assert main(["run", write_config(tmp_path, run_config(str(tmp_path / "in"), nested))]) == EXIT_OUTPUT
    assert "lies under the file" in one_line(capsys, "labelmill: output error:")


def test_unknown_vocabulary_is_a_config_error(tmp_path, capsys, no_ray):
    make_shards(tmp_path / "in", 1, 1)
    out = tmp_path / "out"
    cfg = run_config(str(tmp_path / "in"), str(out))
    cfg["teachers"][0]["vocabulary"] = "coco-81"
    assert main(["run", write_config(tmp_path, cfg)]) == EXIT_CONFIG
    assert "unknown vocabulary 'coco-81'" in one_line(capsys, "labelmill: config error:")
    assert main(["run", "--dry-run", write_config(tmp_path, cfg)]) == EXIT_CONFIG  # found with the config alone
    capsys.readouterr()
    assert not out.exists()


def test_ray_start_up_failure_is_one_line_and_writes_nothing(tmp_path):
    make_shards(tmp_path / "in", 1, 1)
    out = tmp_path / "out"
    (tmp_path / "blocker").write_text("")  # Ray cannot make its temp folder under a file
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "blocker" / "ray"), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "labelmill", "run", write_config(tmp_path, run_config(str(tmp_path / "in"),
                                                                                            str(out)))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_ERROR, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("labelmill:")]
    assert len(lines) == 1 and lines[0].startswith("labelmill: ray error: could not start"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["report", "export-coco"])
def test_reading_commands_on_an_output_that_does_not_exist(tmp_path, capsys, command):
    dest = tmp_path / ("r.html" if command == "report" else "coco")
    assert main([command, str(tmp_path / "nowhere"), str(dest)]) == EXIT_INPUT  # the output is what a reading command reads
    assert "does not exist" in one_line(capsys, "labelmill: input error:")
    assert not dest.exists()
