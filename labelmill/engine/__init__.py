"""How a pipeline runs: Ray start-up, resource plan, fusion, object-store budget, progress, commit loop."""

from labelmill.engine.commit_loop import CommitLoop, RunCounters
from labelmill.engine.executor import Engine, Pipeline
from labelmill.engine.summary import RANDOM_BANNER, RunSummary

__all__ = ["CommitLoop", "Engine", "Pipeline", "RANDOM_BANNER", "RunCounters", "RunSummary"]
