"""Shared fixtures: isolated caches, one Ray session for the whole run."""

from __future__ import annotations

import os

import pytest

# Never touch the network from tests, never leave a Ray auth token behind.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Ray workers inherit the environment: let them import test-only plug-ins.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LABELMILL_CACHE", str(tmp_path_factory.getbasetemp() / "lm-cache"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """The errors of the test must be found before Ray starts."""
    import labelmill.engine.executor as executor
    import labelmill.engine.runtime as runtime

    def refuse(cfg):
        raise AssertionError("Ray was started for a run that should have failed first")

    monkeypatch.setattr(runtime, "start_ray", refuse)
    monkeypatch.setattr(executor, "start_ray", refuse)


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests run first (their own order kept): under ``-n 2 --dist loadscope`` (the README's
    command) the long modules start at once on both workers and the short ones fill in around them."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
