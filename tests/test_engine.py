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
from labelmill.stages.filter import FilterLabels
from labelmill.stages.prepare import PrepareInputs

ROOT = Path(__file__).resolve().parents[1]


def label_pipeline(tmp_path):
    return build_pipeline(load_config(run_config(str(tmp_path), str(tmp_path / "out"))))


def test_the_label_pipeline_checks_out_and_reaches_the_driver_as_manifests(tmp_path):
    p = label_pipeline(tmp_path)
    assert [s.name for s in p.stages] == ["read", "prepare", "infer", "finish", "filter", "write"]
    assert p.check() == ["shard", "indices", "files", "samples", "labelled", "no_labels", "error", "labels_kept",
                         "dropped_low_score", "dropped_small_area", "dropped_over_max", "score_hist"]
    assert p.find(role="model").name == "infer" and p.find(name="write").role == "write"
    assert p.find(role="host").name == "finish" and p.source.name == "read"
    # stateless stages fuse into the operator before them: read+prepare (CPU tasks), infer alone (the device
    # actors), finish+filter+write (CPU actors)
    assert [[s.name for s in g] for g in fuse(p.stages)] == [["read", "prepare"], ["infer"],
                                                             ["finish", "filter", "write"]]


def test_a_mismatched_pair_fails_before_any_work_naming_the_column(tmp_path):
    p = label_pipeline(tmp_path)
    swapped = [p.source, p.find(name="infer"), p.find(name="prepare"), *p.stages[3:]]
    with pytest.raises(ContractError, match=r"hop 'read' -> 'infer'.*\['image', 'orig_h', 'orig_w', 'caption'\]"):
        Pipeline("broken", swapped).check()

    class NeedsScores(FilterLabels):
        name = "needs_scores"
        requires = ("labels", "score_map")

    with pytest.raises(ContractError, match=r"'filter' -> 'needs_scores'.*\['score_map'\]"):
        Pipeline("x", [*p.stages[:5], NeedsScores(None), p.stages[5]]).check()
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
    """The CPU pools (prepare, finish with the teachers' host sides, filter, write) never import torch."""
    code = ("import sys; import labelmill.stages.read, labelmill.stages.prepare, labelmill.stages.finish, "
            "labelmill.stages.filter, labelmill.stages.write, labelmill.store.commit, labelmill.store.read, "
            "labelmill.teachers.hosts, labelmill.teachers.configs, labelmill.config; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_finish_pool_builds_masks_without_torch():
    """A MaskCLIP host side finishes a raw batch in a process that has no torch."""
    code = (
        "import sys, numpy as np\n"
        "from labelmill.teachers.base import host_side, validate_teacher_config, FinishInfo\n"
        "from labelmill.schemas.raw import RawBatch\n"
        "cfg = validate_teacher_config({'type': 'maskclip', 'vocabulary': ['a', 'b'], 'pretrained': None})\n"
        "host = host_side(cfg)\n"
        "stats = np.zeros((1, 6, 3)); stats[0, 0, 1] = 4; stats[0, 1, 1] = 2.0; stats[0, 4:, 1] = 1\n"
        "raw = RawBatch.from_counts({'stats': stats, 'hw': np.array([[2, 2]]), 'starts': np.array([0]),"
        " 'values': np.array([1])}, {'stats': [1], 'hw': [1], 'starts': [1], 'values': [1]})\n"
        "(out,) = host.finish(raw, FinishInfo(['k'], [(2, 2)], [None], [{}]))\n"
        "print(out.labels[0].class_name, out.labels[0].area, out.labels[0].rle['counts'], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["b", "4.0", "04", "False"], out.stdout + out.stderr


def test_prepare_declares_its_row_size_for_the_budget(tmp_path):
    prepare = label_pipeline(tmp_path).find(name="prepare")
    assert isinstance(prepare, PrepareInputs) and prepare.bytes_per_row() == 128 * 128 * 3  # tiny MaskCLIP: long side <= 128 px


def test_the_training_data_side_imports_no_torch():
    """Ray Data's read tasks and decode+target+augment actors of a training run start without torch."""
    code = ("import sys; import labelmill.training.data, labelmill.training.prepare; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
