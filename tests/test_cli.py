"""The command line: help everywhere, exit codes and messages for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import make_shards, run_config
from labelmill.cli import main
from labelmill.exitcodes import EXIT_CONFIG, EXIT_INPUT, EXIT_WEIGHTS


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "labelmill", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["export-coco"], ["report"], ["yield"]])
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
    make_shards(tmp_path / "in", 1, 1)  # the input is listed first (cheap checks before weights)
    cfg = run_config(str(tmp_path / "in"), str(tmp_path / "out"))
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
    from helpers import make_shards

    make_shards(tmp_path / "shards", 2, 2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(str(tmp_path / "shards"), str(tmp_path / "out"))))
    assert main(["run", str(path), "--dry-run", "filter.min_score=0.25"]) == 0
    captured = capsys.readouterr()
    printed = yaml.safe_load(captured.out)
    assert printed["filter"]["min_score"] == 0.25 and printed["teachers"][0]["vocabulary"][0] == "cat"
    assert "input: 2 shards, about 4 samples" in captured.err and "s/image" in captured.err


def test_text_embeddings_command(tmp_path, capsys):
    import numpy as np
    import pyarrow.parquet as pq

    dest = tmp_path / "coco80.parquet"
    assert main(["text-embeddings", str(dest), "--model", "ViT-B-32", "--templates", "single", "--random-init"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err
    table = pq.read_table(dest)
    assert table.num_rows == 80 and table.column("class_name")[0].as_py() == "person"
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (80, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert set(table.column("weights_sha256").to_pylist()) == {"random-init"}
    assert main(["text-embeddings", str(dest), "--vocabulary", "nope", "--random-init"]) == EXIT_CONFIG
    assert "unknown vocabulary 'nope'" in capsys.readouterr().err
    missing = str(tmp_path / "nope.pt")
    assert main(["text-embeddings", str(dest), "--model", "ViT-B-32", "--pretrained", missing]) == EXIT_WEIGHTS
    assert "nope.pt" in capsys.readouterr().err


def test_help_and_config_validation_import_no_torch(tmp_path):
    """Parsing arguments and validating a config load no torch, pandas or pyarrow (the registry is lazy)."""
    import subprocess
    import sys

    cfg = run_config(str(tmp_path), str(tmp_path / "out"))
    cfg["teachers"] = [
        {"type": "maskclip", "vocabulary": "coco-80", "pretrained": None},
        {"type": "glip", "tokenizer": "builtin-test", "mode": "vocabulary", "vocabulary": ["a", "b"]},
        {"type": "vild", "proposals": [{"teacher": "glip"}], "pretrained": None},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import sys, contextlib, io\n"
        "from labelmill.cli import build_parser, main\n"
        "commands = [a.dest for a in build_parser()._subparsers._group_actions][0]\n"
        "names = list(build_parser()._subparsers._group_actions[0].choices)\n"
        "for argv in [['--help']] + [[n, '--help'] for n in names]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "from labelmill.config import load_config\n"
        f"cfg = load_config({str(path)!r})\n"
        "print(len(names), len(cfg.teachers), sorted(m for m in ('torch', 'pandas', 'pyarrow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, teachers, loaded = out.stdout.split(maxsplit=2)
    assert int(n) >= 15 and teachers == "3" and loaded.strip() == "[]", out.stdout + out.stderr
