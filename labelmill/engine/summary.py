"""What a run reports when it ends (printed by ``labelmill run``, kept under ``_labelmill/runs/``)."""

from __future__ import annotations

from dataclasses import dataclass

from labelmill.engine.commit_loop import RunCounters

RANDOM_BANNER = """
################################################################################
##  WARNING: RANDOM WEIGHTS.  This run uses randomly initialised teachers.     ##
##  Its labels are meaningless and every row records weights_sha256=random-init.##
##  Use real weights (an open_clip tag or a checkpoint file) for actual labels. ##
################################################################################
"""


@dataclass
class RunSummary:
    run_id: str
    output: str
    config_hash: str
    shards_total: int
    shards_skipped: int
    counters: RunCounters
    seconds: float
    plan: str
    repair: dict
    bytes_received: int = 0

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "output": self.output,
            "config_hash": self.config_hash,
            "shards_total": self.shards_total,
            "shards_skipped_already_committed": self.shards_skipped,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.counters.samples / self.seconds, 3) if self.seconds else None,
            "plan": self.plan,
            "repair": self.repair,
            "driver_bytes_received": self.bytes_received,
            **self.counters.as_dict(),
        }
