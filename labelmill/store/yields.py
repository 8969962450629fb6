"""Pre-filter score histograms and the yield table computed from them.

The filter stage sees every label before it drops any.  For each image it
records, per teacher and class, the score of every label (``all``), of the
labels a pure score threshold would decide on (``kept``: area at least
``min_area`` and among the ``max_labels_per_image`` highest-scoring of
those; a score threshold keeps exactly the ones of these at or above it),
and the image's highest such score (``images``).  Histograms have
:data:`BINS` bins of width ``1 / BINS`` over [0, 1] (scores below 0 count in
the first bin, 1 and above in the last).

Histograms are added up per manifest row on the workers, per shard group by
the driver's commit loop, and stored in each version record
(``score_hist``), so the number of labels and images surviving any
threshold on the grid (0.1 ... 0.9 and more) is read without relabelling:
``labels(t) = sum(kept[bin >= t])``, ``images(t) = sum(images[bin >= t])``.

Keys are ``"teacher\\tclass"``; ``"teacher\\t*"`` is the teacher over all its
classes and ``"*\\t*"`` the whole run (images counted once, at their best
label of any teacher).  Bins are stored sparsely (``{bin: count}``).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from typing import Iterable

BINS = 20
EDGES = [i / BINS for i in range(BINS + 1)]  # i / 20 is the float a user types for 0.3
THRESHOLDS = [round(0.1 * i, 1) for i in range(1, 10)]
ALL = "*"
KINDS = ("all", "kept", "images")


def score_bin(score: float) -> int:
    return min(max(bisect_right(EDGES, float(score)) - 1, 0), BINS - 1)


def key(teacher: str, cls: str) -> str:
    return f"{teacher}\t{cls}"


def image_entries(labels: list[dict], min_area: float, max_per_image: int | None) -> list[tuple[str, str, float, bool]]:
    """``(teacher, class, score, eligible)`` for every pre-filter label of one image."""
    rows = []
    for lab in labels:
        name = lab.get("class_name")
        if name is None:
            name = lab.get("phrase") or "?"
        rows.append([lab.get("teacher") or "?", name, float(lab["score"]), (lab.get("area") or 0.0) >= min_area])
    if max_per_image is not None:
        ok = sorted((i for i, r in enumerate(rows) if r[3]), key=lambda i: -rows[i][2])
        for i in ok[max_per_image:]:
            rows[i][3] = False
    return [tuple(r) for r in rows]


class ScoreHist:
    """Sparse histograms by key and kind; see the module docstring."""

    def __init__(self, data: dict | None = None):
        self.data: dict[str, dict[str, dict[int, int]]] = {}
        for k, kinds in (data or {}).items():
            self.data[k] = {kind: {int(b): int(n) for b, n in bins.items()} for kind, bins in kinds.items()}

    def _inc(self, k: str, kind: str, b: int, n: int = 1) -> None:
        bins = self.data.setdefault(k, {}).setdefault(kind, {})
        bins[b] = bins.get(b, 0) + n

    def add_image(self, entries: Iterable[tuple[str, str, float, bool]]) -> None:
        best: dict[str, float] = {}
        for teacher, cls, score, eligible in entries:
            b = score_bin(score)
            for k in (key(teacher, cls), key(teacher, ALL), key(ALL, ALL)):
                self._inc(k, "all", b)
                if eligible:
                    self._inc(k, "kept", b)
                    best[k] = max(best.get(k, -1e9), score)
        for k, score in best.items():
            self._inc(k, "images", score_bin(score))

    def merge(self, other: "ScoreHist | dict | None") -> "ScoreHist":
        if other is None:
            return self
        other = other if isinstance(other, ScoreHist) else ScoreHist(other)
        for k, kinds in other.data.items():
            for kind, bins in kinds.items():
                for b, n in bins.items():
                    self._inc(k, kind, b, n)
        return self

    def scaled(self, factor: float) -> "ScoreHist":
        out = ScoreHist()
        for k, kinds in self.data.items():
            for kind, bins in kinds.items():
                for b, n in bins.items():
                    out._inc(k, kind, b, round(n * factor))
        return out

    def to_json(self) -> dict:
        return {k: {kind: {str(b): n for b, n in sorted(bins.items())} for kind, bins in kinds.items()}
                for k, kinds in sorted(self.data.items())}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | None) -> "ScoreHist":
        return cls(json.loads(text) if text else None)

    def dense(self, k: str, kind: str) -> list[int]:
        bins = self.data.get(k, {}).get(kind, {})
        return [bins.get(b, 0) for b in range(BINS)]

    def survivors(self, k: str, kind: str, threshold: float) -> int:
        start = score_bin(threshold)
        return sum(n for b, n in self.data.get(k, {}).get(kind, {}).items() if b >= start)

    def keys(self) -> list[str]:
        return sorted(self.data, key=lambda k: (k.split("\t")[0] == ALL, k.split("\t")[0],
                                                 k.split("\t")[1] != ALL, k.split("\t")[1]))


def yield_rows(hist: ScoreHist, thresholds: Iterable[float] = THRESHOLDS) -> list[dict]:
    """One row per key: labels and images surviving each threshold, plus the pre-filter label count."""
    thresholds = list(thresholds)
    out = []
    for k in hist.keys():
        teacher, cls = k.split("\t")
        out.append({
            "teacher": teacher, "class": cls,
            "labels_prefilter": sum(hist.dense(k, "all")),
            "labels": {f"{t:g}": hist.survivors(k, "kept", t) for t in thresholds},
            "images": {f"{t:g}": hist.survivors(k, "images", t) for t in thresholds},
        })
    return out


def version_hist(records: list[dict], version: int) -> tuple[ScoreHist, bool]:
    """The histogram of the dataset as of ``version``, replayed from the version records.

    Each commit record holds the histogram of the shard group it added.  A
    group counts while its shards stay committed; a group partly replaced
    later counts in proportion to the shards it still has, and the result is
    then marked approximate (so is a version whose runs predate histograms).
    Returns ``(hist, exact)``.
    """
    by_version = {r["version"]: r for r in records}
    owner = _owners(records, version, by_version)
    hist, exact = ScoreHist(), True
    groups: dict[int, int] = {}
    for v in owner.values():
        groups[v] = groups.get(v, 0) + 1
    for v, alive in sorted(groups.items()):
        rec = by_version[v]
        if "score_hist" not in rec:
            exact = False
            continue
        added = len(rec.get("shards_added", [])) or 1
        part = ScoreHist(rec["score_hist"])
        if alive < added:
            part, exact = part.scaled(alive / added), False
        exact = exact and not rec.get("score_hist_approximate", False)
        hist.merge(part)
    return hist, exact


def _owners(records: list[dict], version: int, by_version: dict[int, dict]) -> dict[str, int]:
    """shard -> the version of the commit record whose group holds its rows, as of ``version``."""
    owner: dict[str, int] = {}
    for rec in records:
        if rec["version"] > version:
            break
        if rec.get("kind") == "rollback" and rec.get("rolled_back_to") in by_version:
            owner = _owners(records, rec["rolled_back_to"], by_version)
            continue
        for s in rec.get("shards_removed", []):
            owner.pop(s, None)
        for item in rec.get("shards_added", []):
            owner[item["shard"]] = rec["version"]
    return owner


def version_yield(output: str, version: int | str | None = None, storage_options: dict | None = None,
                  thresholds: Iterable[float] = THRESHOLDS) -> dict:
    """The yield table of one dataset version (the latest by default), as a JSON-ready dict."""
    from labelmill.store.commit import OutputStore
    from labelmill.store.read import pick_record

    records = OutputStore(output, storage_options).versions()
    record = pick_record(records, version, output)
    hist, exact = version_hist(records, record["version"])
    return {"output": output, "version": record["version"], "exact": exact, "bins": BINS,
            "thresholds": [f"{t:g}" for t in thresholds], "rows": yield_rows(hist, thresholds),
            "histograms": {k: {kind: hist.dense(k, kind) for kind in KINDS} for k in hist.keys()}}


def format_yield(table: dict) -> str:
    """The yield table as text: labels / images surviving each threshold, one line per teacher and class."""
    ths = table["thresholds"]
    head = f"{'teacher':<12} {'class':<20} {'what':<7} {'prefilter':>9}" + "".join(f"{'>=' + t:>9}" for t in ths)
    lines = [f"yield of {table['output']} version {table['version']}"
             + ("" if table["exact"] else " (approximate: some groups were replayed, replaced or predate histograms)"),
             head, "-" * len(head)]
    for row in table["rows"]:
        teacher = "ALL" if row["teacher"] == ALL else row["teacher"]
        cls = "(all classes)" if row["class"] == ALL else row["class"]
        for what in ("labels", "images"):
            pre = f"{row['labels_prefilter']:,}" if what == "labels" else ""
            lines.append(f"{teacher:<12} {cls[:20]:<20} {what:<7} {pre:>9}" + "".join(f"{row[what][t]:>9,}" for t in ths))
    if not table["rows"]:
        lines.append("(no labels recorded)")
    return "\n".join(lines)
