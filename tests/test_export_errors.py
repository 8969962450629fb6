"""Bad input to the exports, through the CLI: one line on stderr, a documented exit code, nothing left behind."""

from __future__ import annotations

import pytest

from helpers import gt_sample, gt_teacher, run_config
from labelmill.cli import main
from labelmill.config import load_config
from labelmill.io.shards import write_shard
from labelmill.pipelines.label import run

EXPORTS = ["export-coco", "export-yolo", "export-fiftyone"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_session):
    """``bad``: version 1 empty (an empty shard), version 2 failed (every sample lacks an image).
    ``good``: one labelled shard."""
    root = tmp_path_factory.mktemp("export-errors")
    shards = root / "bad-shards"
    write_shard(str(shards / "a-empty.tar"), [])
    cfg = run_config(str(shards), str(root / "bad"), teachers=[gt_teacher()])
    run(load_config(cfg))
    write_shard(str(shards / "b-failed.tar"), [("k1", {"txt": b"no image"}), ("k2", {"txt": b"none either"})])
    run(load_config(cfg))
    write_shard(str(root / "good-shards" / "g.tar"), [gt_sample("g0", 0), gt_sample("g1", 1)])
    run(load_config(run_config(str(root / "good-shards"), str(root / "good"), teachers=[gt_teacher()])))
    return root


def _run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("command", EXPORTS)
def test_bad_input_gets_one_line_and_its_exit_code(outputs, tmp_path, capsys, command):
    root = outputs
    cases = [
        ([root / "bad", tmp_path / "d1", "--version", "1"], 6, "has no samples"),
        ([root / "bad", tmp_path / "d2"], 6, "failed version: all 2 samples are errors"),
        ([root / "missing", tmp_path / "d3"], 4, "does not exist"),
        ([root / "good", tmp_path / "d4", "--version", "7"], 4, "has no version 7"),
        ([root / "good", tmp_path / "d5", "--version", "1999-01-01T00:00:00"], 4, "had no version yet at"),
        ([root / "good", tmp_path / "d6", "--classes", "unicorn"], 2, "unknown class(es) ['unicorn']"),
    ]
    for args, code, words in cases:
        got, err = _run(capsys, command, *args)
        assert (got, len(err.splitlines())) == (code, 1), (args, err)
        assert words in err and "Traceback" not in err, err
        assert not args[1].exists()  # nothing half-written is left behind

    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    got, err = _run(capsys, command, root / "good", dest)
    assert got == 5 and "already exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert (dest / "keep.txt").read_text() == "mine"
    assert _run(capsys, command, root / "good", dest, "--overwrite")[0] == 0
    assert not (dest / "keep.txt").exists() and (dest / "manifest.json").exists()
    got, err = _run(capsys, command, root / "good", root, "--overwrite")
    assert got == 5 and "holds the output" in err
    assert (root / "good" / "samples").exists()


def test_unknown_teacher_and_bad_id_map(outputs, tmp_path, capsys):
    root = outputs
    got, err = _run(capsys, "export-coco", root / "good", tmp_path / "a", "--teacher", "nobody")
    assert got == 2 and "no labels from teacher(s) ['nobody']" in err
    bad = tmp_path / "ids.json"
    bad.write_text("{not json")
    got, err = _run(capsys, "export-coco", root / "good", tmp_path / "b", "--category-ids", bad)
    assert got == 2 and "is not JSON" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
