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


def test_host_pools_are_sized_from_the_gpu_node():
    """Prepare tasks and finish actors share host_cpus_per_gpu per GPU; everything fits the node."""
    plan = plan_resources(RayConfig(), total_cpus=16, total_gpus=1, node_host_cpus_per_gpu=15.0)
    assert plan.host_cpus_per_gpu == 15 and plan.read_tasks == 8 and (plan.host_min, plan.host_max) == (1, 8)
    assert plan.cpus_per_actor + plan.read_tasks * plan.read_cpus + plan.host_max * plan.host_cpus <= 16
    # the config value wins; four GPUs give four times the pools
    four = plan_resources(RayConfig(host_cpus_per_gpu=6), total_cpus=32, total_gpus=4, node_host_cpus_per_gpu=7.0)
    assert four.actors == 4 and four.read_tasks == 12 and four.host_max == 12
    # no GPU node seen yet (an autoscaling cluster): a stated default, not zero
    cold = plan_resources(RayConfig(max_actors=2), total_cpus=4, total_gpus=0, autoscaling=True, max_gpus=8)
    assert cold.host_cpus_per_gpu == 4 and cold.host_max == 4
    # a CPU plan: one finish actor beside the infer actor and the read task, on 2 CPUs
    cpu = plan_resources(RayConfig(), total_cpus=2, total_gpus=0)
    assert (cpu.host_min, cpu.host_max, cpu.host_cpus) == (1, 1, 0.25) and cpu.host_cpus_per_gpu is None
    assert cpu.cpus_per_actor + cpu.read_tasks * cpu.read_cpus + cpu.host_cpus <= 2
    with pytest.raises(ConfigError, match="finish"):
        plan_resources(RayConfig(finish_actors=8), total_cpus=2, total_gpus=0)


def test_several_infer_actors_share_a_gpu():
    plan = plan_resources(RayConfig(actors_per_gpu=3), total_cpus=16, total_gpus=2, node_host_cpus_per_gpu=7.5)
    assert plan.actors == 6 and abs(plan.gpus_per_actor - 1 / 3) < 1e-9 and abs(plan.cpus_per_actor - 1 / 3) < 1e-9
    assert "1 infer actor" not in plan.describe() and "0.333 GPU" in plan.describe()
    with pytest.raises(ValueError, match="actors_per_gpu or gpus_per_actor"):
        RayConfig(actors_per_gpu=2, gpus_per_actor=0.5)
