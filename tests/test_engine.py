"""The engine's pipeline model: contracts per hop, stages by name/role, fusion, layering (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_config
from labelmill.config import load_config
from labelmill.engine import Pipeline
from labelmill.engine.executor import fuse
from labelmill.pipelines.label import build_pipeline
from labelmill.stages.base import ContractError
from labelmill.stages.decode import DecodeImages
from labelmill.stages.filter import FilterLabels

ROOT = Path(__file__).resolve().parents[1]


def label_pipeline(tmp_path):
    return build_pipeline(load_config(run_config(str(tmp_path), str(tmp_path / "out"))))


def test_the_label_pipeline_checks_out_and_reaches_the_driver_as_manifests(tmp_path):
    p = label_pipeline(tmp_path)
    assert [s.name for s in p.stages] == ["read", "decode", "label", "filter", "write"]
    assert p.check() == ["shard", "indices", "files", "samples", "labelled", "no_labels", "error", "labels_kept",
                         "dropped_low_score", "dropped_small_area", "dropped_over_max", "score_hist"]
    assert p.find(role="model").name == "label" and p.find(name="write").role == "write"
    assert p.source.name == "read"
    # stateless stages fuse into the operator before them: read+decode, label+filter+write
    assert [[s.name for s in g] for g in fuse(p.stages)] == [["read", "decode"], ["label", "filter", "write"]]


def test_a_mismatched_pair_fails_before_any_work_naming_the_column(tmp_path):
    p = label_pipeline(tmp_path)
    swapped = [p.source, p.find(name="label"), p.find(name="decode"), *p.stages[3:]]
    with pytest.raises(ContractError, match=r"hop 'read' -> 'label'.*\['image', 'orig_h', 'orig_w', 'caption'\]"):
        Pipeline("broken", swapped).check()

    class NeedsScores(FilterLabels):
        name = "needs_scores"
        requires = ("labels", "score_map")

    with pytest.raises(ContractError, match=r"'filter' -> 'needs_scores'.*\['score_map'\]"):
        Pipeline("x", [*p.stages[:4], NeedsScores(None), p.stages[4]]).check()
    with pytest.raises(ValueError, match="source"):
        Pipeline("x", p.stages[1:])
    with pytest.raises(LookupError):
        p.find(role="nothing")


def test_pipeline_module_is_a_short_composition_without_ray():
    text = (ROOT / "pipelines" / "label.py").read_text()
    assert len(text.splitlines()) <= 65
    assert "import ray" not in text and "from ray" not in text
    assert "stages[" not in text  # stages are never wired by position


def test_stages_that_run_no_model_import_neither_torch_nor_ray():
    code = ("import sys; import labelmill.stages.read, labelmill.stages.decode, labelmill.stages.filter, "
            "labelmill.stages.write, labelmill.store.commit, labelmill.store.read; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_decode_declares_its_row_size_for_the_budget(tmp_path):
    decode = label_pipeline(tmp_path).find(name="decode")
    assert isinstance(decode, DecodeImages) and decode.bytes_per_row() == 128 * 128 * 3  # tiny MaskCLIP: long side <= 128 px


def test_the_training_data_side_imports_no_torch():
    """Ray Data's read tasks and decode+target+augment actors of a training run start without torch."""
    code = ("import sys; import labelmill.training.data, labelmill.training.prepare; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
