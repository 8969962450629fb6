"""What a user sees of a training run: the status line, run.json, a trainer that keeps to its own Ray."""

from __future__ import annotations

import json

import pytest


def test_status_line_says_step_loss_rate_eta_and_checkpoint():
    from labelmill.training.watch import status_text

    assert "starting Ray Train" in status_text("glip", None, 100, 12.0)
    line = status_text("glip", {"step": 40, "loss": 1.23456, "samples_per_s": 8.0, "steps_per_s": 2.0,
                                "checkpoint_step": 20}, 100, 95.0)
    assert line == "[labelmill] train glip: step 40/100, loss 1.235, 8.0 samples/s, ETA 30s, checkpoint at step 20 | 1m35s"
    assert "no checkpoint yet" in status_text("glip", {"step": 3}, 100, 5.0)


def test_run_record_keeps_every_attempt(tmp_path):
    from labelmill.training.config import load_train_config
    from labelmill.training.watch import RunRecord

    cfg = load_train_config("glip", {"data": {"output": "x"}, "checkpoint": {"path": str(tmp_path), "name": "r"},
                                     "model": {"preset": "tiny", "tokenizer": "builtin-test"}})
    RunRecord(cfg, {"version": 3}, None).end("interrupted", step=7)
    RunRecord(cfg, {"version": 3}, 5)  # killed: no end
    again = RunRecord(cfg, {"version": 3}, 5)
    again.end("finished", step=10)
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["status"] == "finished" and record["dataset"] == {"version": 3} and record["step"] == 10
    assert [(a["status"], a["from_step"]) for a in record["attempts"]] == [
        ("interrupted", 0), ("running", 5), ("finished", 5)]
    assert record["config"]["task"] == "glip"


def test_the_private_trainer_has_no_placement_group_cleaner_and_handles_ctrl_c():
    """Ray Train's cleaner asks the state API about "the latest cluster" on the host, which beside another
    Ray is not this process's private one; labelmill's trainer leaves it out there, and only there."""
    pytest.importorskip("ray.train.v2._internal.callbacks.placement_group_callback")
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from labelmill.training.loop import _trainer_class

    def kinds(private: bool) -> set:
        trainer = _trainer_class(private)(lambda: None, scaling_config=None)
        return {type(c) for c in trainer._create_default_callbacks()}

    assert PlacementGroupCleanerCallback not in kinds(True)
    assert PlacementGroupCleanerCallback in kinds(False)


@pytest.mark.parametrize("args,said", [(["--max-images", "many"], "neither a whole number nor 'all'"),
                                       (["--per-page", "0"], "0 is not above 0")])
def test_report_counts_are_checked_before_any_work(tmp_path, capsys, args, said):
    from labelmill.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "out"), str(tmp_path / "r.html"), *args])
    assert exc.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
