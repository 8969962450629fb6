"""Config validation happens before any work, with the path of every problem."""

from __future__ import annotations

import pytest

from helpers import tiny_maskclip
from labelmill.config import ConfigError, load_config
from labelmill.engine.runtime import plan_resources
from labelmill.config import RayConfig


def base(**kw):
    cfg = {"input": {"shards": "/data/*.tar"}, "output": {"path": "/out"}, "teachers": [tiny_maskclip()]}
    cfg.update(kw)
    return cfg


def test_valid_config_and_overrides():
    cfg = load_config(base(), ["output.path=/elsewhere", "teachers.0.image_size=128", "filter.min_score=0.3",
                               "filter.per_class_min_score.cat=0.9"])
    assert cfg.output.path == "/elsewhere"
    assert cfg.teachers[0].image_size == 128
    assert cfg.filter.per_class_min_score == {"cat": 0.9}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(bogus=1), "bogus: unknown key"),
        (lambda c: c["teachers"][0].update(imag_size=3), "teachers.0.imag_size: unknown key"),
        (lambda c: c["teachers"][0].update(mode="tiles"), "teachers.0.mode"),
        (lambda c: c.update(filter={"min_score": 2}), "filter.min_score"),
        (lambda c: c.update(teachers=[]), "teachers"),
        (lambda c: c.update(teachers=[{"type": "nope"}]), "unknown teacher type 'nope'"),
        (lambda c: c.update(teachers=[{"type": "no.such.module:T"}]), "cannot import module"),
        (lambda c: c.update(teachers=[{"type": "labelmill.config:RunConfig"}]), "not a labelmill Teacher"),
        (lambda c: c.update(teachers=[tiny_maskclip(), tiny_maskclip()]), "must be unique"),
        (lambda c: c["teachers"][0].update(slide_stride=600), "slide_stride"),
        (lambda c: c.update(output={}), "output.path"),
    ],
)
def test_invalid_configs_name_the_problem(mutate, message):
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(base(), ["output.path"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(base(), ["teachers.5.image_size=3"])


def test_label_hash_ignores_where_and_how_fast():
    a = load_config(base())
    b = load_config(base(), ["output.path=/x", "ray.batch_size=3", "input.shards=/y"])
    c = load_config(base(), ["filter.min_score=0.5"])
    assert a.label_hash() == b.label_hash() != c.label_hash()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resource_plan_never_starves_readers_on_two_cpus():
    plan = plan_resources(RayConfig(), total_cpus=2, total_gpus=0)
    assert plan.actors == 1 and plan.torch_threads == 2
    assert plan.actors * plan.cpus_per_actor + plan.read_tasks * plan.read_cpus <= 2
    with pytest.raises(ConfigError, match="deadlock"):
        plan_resources(RayConfig(teacher_actors=2, cpus_per_actor=1), total_cpus=2, total_gpus=0)
    two = plan_resources(RayConfig(teacher_actors=2), total_cpus=2, total_gpus=0)
    assert two.actors == 2 and two.read_tasks == 2 and 2 * two.cpus_per_actor + 0.5 <= 2 and two.torch_threads == 1


def test_resource_plan_on_gpus():
    plan = plan_resources(RayConfig(), total_cpus=16, total_gpus=4)
    assert plan.actors == 4 and plan.gpus_per_actor == 1
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(RayConfig(teacher_actors=8), total_cpus=16, total_gpus=4)
    assert plan_resources(RayConfig(device="cpu"), 16, 4).gpus_per_actor == 0
