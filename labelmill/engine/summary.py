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
    notes: list[str] | None = None  # one line per teacher that kept nothing (see kept_nothing)

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
            "notes": list(self.notes or []),
        }

    def say_kept_nothing(self, cfg, hist, stream) -> None:
        """Note (and print) one line for each teacher that kept no label: see :func:`kept_nothing`."""
        c = self.counters
        self.notes = kept_nothing(cfg, hist, c.samples - c.error, c.labels_kept)
        for note in self.notes:
            print(f"[labelmill] {note}", file=stream)


#: a teacher's own score cut before the filter (config keys), said when it kept nothing
_OWN_THRESHOLDS = ("score_floor", "pre_nms_thresh", "min_score", "box_threshold", "mask_threshold")


def kept_nothing(cfg, hist, samples: int, labels_kept: int = 0) -> list[str]:
    """One line for each teacher that kept no label in this run, with its best pre-filter score and the
    threshold that stopped it: the filter's ``min_score``, or (nothing reached the filter) the teacher's
    own thresholds.  ``hist``: the run's pre-filter score histograms (labelmill.store.yields.ScoreHist)."""
    from labelmill.store.yields import ALL, BINS, key

    if samples == 0 or (not hist.data and labels_kept):  # no histogram recorded: nothing to say
        return []
    lines = []
    for t in cfg.teachers:
        if not getattr(t, "emits_labels", True):
            continue
        name = t.instance_name
        k = key(name, ALL)
        kept = hist.survivors(k, "kept", cfg.filter.min_score)
        if kept or (cfg.filter.per_class_min_score and hist.data.get(k)):
            continue  # per-class thresholds: counted per class by `labelmill yield`
        seen = {b: n for b, n in hist.data.get(k, {}).get("all", {}).items() if n}
        if seen:
            top = max(seen)
            best = f"{top / BINS:.2f}-{(top + 1) / BINS:.2f}"
            if not hist.data.get(k, {}).get("kept"):
                why = "filter.min_area or filter.max_labels_per_image removed every one"
            else:
                why = f"below filter.min_score {cfg.filter.min_score:g}"
            lines.append(f"teacher {name} kept no labels: {sum(seen.values())} before the filter, best score "
                         f"{best}, {why}")
        else:
            own = {f: getattr(t, f) for f in _OWN_THRESHOLDS if getattr(t, f, None) is not None}
            said = ", ".join(f"{f} {v:g}" for f, v in own.items()) or "its own thresholds"
            lines.append(f"teacher {name} kept no labels: none reached the filter; its own cut ({said}) "
                         "stopped them all")
    return lines
