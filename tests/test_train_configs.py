"""Every training config the repository ships validates as its task's config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_training_config_validates(path):
    from labelmill.training.config import load_train_config

    task = yaml.safe_load(path.read_text())["task"]
    cfg = load_train_config(task, path)
    assert cfg.task == task and cfg.optim.max_steps > 0


def test_there_is_a_training_config():
    assert CONFIGS
