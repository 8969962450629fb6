"""The driver's commit loop: manifests in, one dataset version per group of complete shards.

Workers send one manifest row per (batch, shard) (``MANIFEST``: staged
files, the sample indices they hold, status counts).  The source reports
out of band how many samples each shard has (:meth:`CommitLoop.shard_read`).
A shard is complete when the indices received cover that many samples;
every ``commit_every`` complete shards are committed as one version, or,
with ``single_version=True`` (a nightly refresh), everything at
:meth:`CommitLoop.finish` as ONE version, together with the removal of
``remove_shards`` (deleted, changed and stale shards' old rows).

Retried Ray tasks may deliver a shard's rows twice.  A manifest whose
indices were all received already is dropped (its staged files are never
committed, and the next run's repair deletes them); one that overlaps in
part has its files rewritten without the rows already received.  So every
sample is committed exactly once.  Nothing here uses Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelmill.schemas.tables import COUNT_COLUMNS, counts_of_samples
from labelmill.store.commit import OutputStore
from labelmill.store.yields import ScoreHist


@dataclass
class RunCounters:
    samples: int = 0
    labelled: int = 0
    no_labels: int = 0
    error: int = 0
    labels_kept: int = 0
    dropped: dict[str, int] = field(
        default_factory=lambda: {"dropped_low_score": 0, "dropped_small_area": 0, "dropped_over_max": 0}
    )
    duplicates: int = 0
    shards_committed: int = 0
    #: shard -> why storage could not deliver it; none of its rows are committed, the next run retries it
    failed_shards: dict[str, str] = field(default_factory=dict)
    commits: int = 0
    versions: list[int] = field(default_factory=list)

    def add(self, counts: dict[str, int]) -> None:
        for c in ("samples", "labelled", "no_labels", "error", "labels_kept", "duplicates"):
            setattr(self, c, getattr(self, c) + int(counts.get(c, 0)))
        for c in self.dropped:
            self.dropped[c] += int(counts.get(c, 0))

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "labelled": self.labelled,
            "no_labels": self.no_labels,
            "error": self.error,
            "labels_kept": self.labels_kept,
            "dropped": {k.removeprefix("dropped_"): v for k, v in self.dropped.items()},
            "duplicates": self.duplicates,
            "shards_committed": self.shards_committed,
            "failed_shards": dict(self.failed_shards),
            "commits": self.commits,
            "versions": list(self.versions),
        }


class _Shard:
    __slots__ = ("indices", "manifests", "counts", "hist", "hist_approx")

    def __init__(self) -> None:
        self.indices: set[int] = set()
        self.manifests: list[dict] = []
        self.counts: dict[str, int] = {c: 0 for c in COUNT_COLUMNS}
        self.hist = ScoreHist()
        self.hist_approx = False


class CommitLoop:
    """See the module docstring."""

    def __init__(self, store: OutputStore, commit_every: int, *, fingerprints: dict[str, dict] | None = None,
                 info: dict[str, Any] | None = None, replace_shards: set[str] | frozenset = frozenset(),
                 shard_fields: dict[str, Any] | None = None, single_version: bool = False,
                 remove_shards: Any = (), before_commit=None, kind: str = "commit"):
        self.store = store
        self.shard_fields = dict(shard_fields or {})  # extra fields of every committed shard item
        self.single_version = single_version
        self.remove_shards = sorted(set(remove_shards))  # old rows leaving in the (single) version
        self.before_commit = before_commit  # e.g. the writer lock's ensure_held
        self.kind = kind  # of the version records
        self.replace_shards = set(replace_shards)  # shards whose committed rows a new read replaces
        self.commit_every = commit_every
        self.fingerprints = fingerprints or {}
        self.info = dict(info or {})
        self.shards: dict[str, _Shard] = {}
        self.totals: dict[str, tuple[int, int]] = {}
        self.complete: list[str] = []
        self.done: set[str] = set()
        self.counters = RunCounters()    # rows received this run (committed or not)
        self.committed = RunCounters()   # rows committed this run
        self.replayed_rows = 0
        self.score_hist = ScoreHist()  # pre-filter score histograms of everything committed this run
        self.bytes_received = 0
        self._group_started = time.monotonic()

    # ---------------------------------------------------------------- intake
    def add(self, manifests: pa.Table) -> None:
        """Manifest rows from the workers (any order, possibly replayed)."""
        self.bytes_received += manifests.nbytes
        for row in manifests.to_pylist():
            self._accept(row)
        self._commit_ready()

    def shard_read(self, shard: str, rows: int, duplicates: int = 0, failed: str | None = None) -> None:
        """The source finished ``shard``: it has ``rows`` samples (and skipped ``duplicates``).

        ``failed`` (a reason) says the storage could not deliver the whole
        shard: the rows received for it are dropped (their staged files are
        never committed), later ones are ignored, and the shard is not
        recorded as done, so the next run reads it again.
        """
        if shard in self.done or shard in self.totals or shard in self.committed.failed_shards:
            return
        if failed is not None:
            self.committed.failed_shards[shard] = failed
            state = self.shards.pop(shard, None)
            if state is not None:
                self.counters.add({c: -v for c, v in state.counts.items()})
            return
        self.totals[shard] = (int(rows), int(duplicates))
        self._check(shard)
        self._commit_ready()

    def _accept(self, row: dict) -> None:
        shard = row["shard"]
        if shard in self.committed.failed_shards:
            return
        if shard in self.done:
            self.replayed_rows += len(row["indices"])
            return
        state = self.shards.setdefault(shard, _Shard())
        indices = set(row["indices"])
        overlap = indices & state.indices
        if overlap == indices:
            self.replayed_rows += len(indices)
            return
        if overlap:
            # the manifest's histogram covers rows already received; it cannot be split by row,
            # so it is counted in proportion and the version says its yield table is approximate
            hist = ScoreHist.loads(row.get("score_hist")).scaled(1 - len(overlap) / len(indices))
            row = self._without(row, overlap)
            row["score_hist"] = hist.dumps()
            state.hist_approx = True
            self.replayed_rows += len(overlap)
        state.hist.merge(ScoreHist.loads(row.get("score_hist")))
        state.indices.update(row["indices"])
        state.manifests.append(row)
        counts = {c: int(row.get(c) or 0) for c in COUNT_COLUMNS}
        for c in COUNT_COLUMNS:
            state.counts[c] += counts[c]
        self.counters.add(counts)
        self._check(shard)

    def _without(self, row: dict, drop: set[int]) -> dict:
        """Rewrite a partly replayed manifest's staged files without the rows already received."""
        files, counts = [], None
        for f in row["files"]:
            log = self.store.table(f["table"])
            path = log.uri_of(f["path"])
            with self.store.fs.open(path, "rb") as fh:
                table = pq.read_table(fh)
            table = table.filter(pc.invert(pc.is_in(table.column("index"), pa.array(sorted(drop), pa.int64()))))
            if f["table"] == "samples":
                counts = counts_of_samples(table)
            if table.num_rows:
                files.append(self.store.stage_table(f["table"], table))
        keep = [i for i in row["indices"] if i not in drop]
        return {**row, "indices": keep, "files": files, **(counts or {c: 0 for c in COUNT_COLUMNS})}

    def _check(self, shard: str) -> None:
        total = self.totals.get(shard)
        if total is None:
            return
        got = len(self.shards[shard].indices) if shard in self.shards else 0
        if got > total[0]:
            raise RuntimeError(f"shard {shard} produced {got} rows but its source counted {total[0]}")
        if got == total[0] and shard not in self.complete:
            self.complete.append(shard)

    # ---------------------------------------------------------------- commit
    def _commit_ready(self) -> None:
        if self.single_version:
            return
        while len(self.complete) >= self.commit_every:
            group, self.complete = self.complete[: self.commit_every], self.complete[self.commit_every:]
            self._commit(group)

    def _commit(self, group: list[str]) -> None:
        states = [self.shards.get(s) or _Shard() for s in group]
        counts = {c: sum(st.counts[c] for st in states) for c in COUNT_COLUMNS}
        counts["duplicates"] = sum(self.totals[s][1] for s in group)
        info = dict(self.info, seconds=time.monotonic() - self._group_started)
        hist = ScoreHist()
        for st in states:
            hist.merge(st.hist)
        items = [{"shard": s, "fingerprint": self.fingerprints.get(s, {}), **self.shard_fields,
                  "dropped_small_area": st.counts["dropped_small_area"],
                  "dropped_over_max": st.counts["dropped_over_max"]} for s, st in zip(group, states)]
        remove = [s for s in group if s in self.replace_shards]
        if self.single_version:
            remove = sorted(set(remove) | set(self.remove_shards))
        if self.before_commit is not None:
            self.before_commit()
        record = self.store.commit(
            [m for st in states for m in st.manifests],
            items,
            remove_shards=remove,
            kind=self.kind,
            counts=counts,
            info=info,
            score_hist=(hist.to_json(), any(st.hist_approx for st in states)),
        )
        self.score_hist.merge(hist)
        self._group_started = time.monotonic()
        for s in group:
            self.shards.pop(s, None)
            self.done.add(s)
        self.counters.duplicates += counts["duplicates"]
        self.committed.add(counts)
        self.committed.shards_committed += len(group)
        self.committed.commits += 1
        self.committed.versions.append(record["version"])

    def finish(self) -> RunCounters:
        pending = sorted(s for s in set(self.shards) | set(self.totals)
                         if s not in self.done and s not in self.complete and s not in self.committed.failed_shards)
        if pending:
            raise RuntimeError(f"stream ended with incomplete shards: {pending[:5]}")
        if self.complete or (self.single_version and self.remove_shards):
            self._commit(self.complete)
            self.complete = []
        return self.committed
