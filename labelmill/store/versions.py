"""Dataset versions for people and programs: list, diff, roll back, vacuum.

Everything here reads the version records (``_labelmill/versions``) and the
table logs; ``rollback`` and ``vacuum`` write, under the output's writer
lock (:class:`labelmill.store.lock.OutputLock`).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow.compute as pc

from labelmill.store.commit import STAGING, VACUUM_FILE, OutputStore
from labelmill.store.lock import OutputLock
from labelmill.store.read import DatasetVersion, existing_output, readable_record
SCORE_BINS = np.linspace(0.0, 1.0, 11)


# ------------------------------------------------------------------ versions
def _shard_changes(previous: dict[str, dict], record: dict) -> dict[str, int]:
    added = {item["shard"]: item for item in record.get("shards_added", [])}
    removed = set(record.get("shards_removed", []))
    new = [s for s in added if s not in previous]
    replaced = [s for s in added if s in previous]
    changed = [s for s in replaced if previous[s].get("fingerprint") != added[s].get("fingerprint")]
    return {"new": len(new), "changed": len(changed), "stale": len(replaced) - len(changed),
            "deleted": len(removed - set(added))}


def describe_versions(output: str, storage_options: dict | None = None) -> list[dict]:
    """One summary per version, oldest first (what ``labelmill versions`` prints)."""
    store = existing_output(output, storage_options)
    records = store.versions()
    vacuumed = store.vacuumed()
    out, state = [], {}
    for rec in records:
        changes = _shard_changes(state, rec)
        for shard in rec.get("shards_removed", []):  # as OutputStore.shard_items replays, in place
            state.pop(shard, None)
        for item in rec.get("shards_added", []):
            state[item["shard"]] = item
        out.append({
            "version": rec["version"],
            "time": rec["time"],
            "kind": rec.get("kind"),
            "shards": changes,
            "shards_total": len(state),
            "rows_added": rec.get("rows_added", {}),
            "rows_by_status": rec.get("counts_by_status", {}),
            "teachers": rec.get("teacher_hashes", {}),
            "config_hash": rec.get("config_hash"),
            "seconds": rec.get("seconds"),
            "rolled_back_to": rec.get("rolled_back_to"),
            "readable": rec["version"] not in vacuumed,
        })
    return out


def _kind(r: dict) -> str:
    return (r["kind"] or "") + (f"->{r['rolled_back_to']}" if r.get("rolled_back_to") is not None else "")


def format_versions(rows: list[dict]) -> str:
    width = max([8] + [len(_kind(r)) for r in rows])
    head = f"{'version':>7}  {'time (UTC)':19}  {'kind':{width}}  {'new':>5} {'chg':>5} {'del':>5} {'stale':>5}  " \
           f"{'shards':>6}  {'labels+':>8}  {'samples+':>8}  {'secs':>7}  teachers"
    lines = [head]
    for r in rows:
        s, rows_added = r["shards"], r["rows_added"]
        kind = _kind(r)
        secs = f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), (int, float)) else "-"
        teachers = ",".join(f"{k}:{v[:8]}" for k, v in sorted(r["teachers"].items()))
        # a rollback writes no rows (it re-publishes an earlier version's files): no row counts to show
        labels, samples = ("-", "-") if r.get("rolled_back_to") is not None else (
            rows_added.get("labels", 0), rows_added.get("samples", 0))
        lines.append(f"{r['version']:>7}  {r['time'][:19]:19}  {kind:{width}}  {s['new']:>5} {s['changed']:>5} "
                     f"{s['deleted']:>5} {s['stale']:>5}  {r['shards_total']:>6}  {labels:>8}  "
                     f"{samples:>8}  {secs:>7}  {teachers}"
                     + ("" if r["readable"] else "  (vacuumed)"))
    return "\n".join(lines)


# ------------------------------------------------------------------ diff
#: diff's score percentiles come from a histogram of this many bins over [0, 1] (exact to 1 / FINE_BINS)
FINE_BINS = 100_000


def _version_stats(view: DatasetVersion) -> dict[str, Any]:
    """Status and class counts and the score distribution of a version, streamed batch by batch: memory is
    one batch and a fixed histogram however many labels the version holds."""
    status: Counter = Counter()
    classes: Counter = Counter()
    fine = np.zeros(FINE_BINS + 1, np.int64)
    total, n = 0.0, 0
    if "samples" in view.table_names():
        for batch in view.iter_batches("samples", columns=["status"], batch_size=1 << 20):
            for r in pc.value_counts(batch.column(0)).to_pylist():
                status[r["values"]] += r["counts"]
    if "labels" in view.table_names():
        for batch in view.iter_batches("labels", columns=["class_name", "score"], batch_size=1 << 20):
            for r in pc.value_counts(batch.column(0)).to_pylist():
                classes[str(r["values"])] += r["counts"]
            scores = batch.column(1).to_numpy(zero_copy_only=False).astype(float)
            scores = np.clip(scores[~np.isnan(scores)], 0.0, 1.0)
            fine += np.bincount((scores * FINE_BINS).astype(np.int64), minlength=FINE_BINS + 1)
            total += float(scores.sum())
            n += scores.size
    per = FINE_BINS // (len(SCORE_BINS) - 1)
    coarse = fine[:FINE_BINS].reshape(len(SCORE_BINS) - 1, per).sum(axis=1)
    coarse[-1] += fine[FINE_BINS]  # a score of exactly 1 counts in the last bin, as numpy's histogram does
    cum = np.cumsum(fine)

    def percentile(q: float) -> float | None:
        if not n:
            return None
        i = int(np.searchsorted(cum, q / 100 * (n - 1), side="right"))
        return min(1.0, (i + 0.5) / FINE_BINS)

    return {"status": dict(status), "classes": dict(classes), "labels": n,
            "score": {"mean": total / n if n else None, **{f"p{q}": percentile(q) for q in (10, 50, 90)},
                      "histogram": coarse.tolist()}}


def diff_versions(output: str, a: int | str, b: int | str, storage_options: dict | None = None) -> dict:
    """Counts per class and status, shards in and out, and the score-distribution shift from A to B."""
    store = existing_output(output, storage_options)
    ra, rb = readable_record(store, a), readable_record(store, b)
    records = store.versions()
    items_a = OutputStore.shard_items([r for r in records if r["version"] <= ra["version"]])
    items_b = OutputStore.shard_items([r for r in records if r["version"] <= rb["version"]])
    sa, sb = _version_stats(DatasetVersion(store, ra)), _version_stats(DatasetVersion(store, rb))

    def delta(x: dict, y: dict) -> dict:
        return {k: {"a": x.get(k, 0), "b": y.get(k, 0), "change": y.get(k, 0) - x.get(k, 0)}
                for k in sorted(set(x) | set(y))}

    ha, hb = np.array(sa["score"]["histogram"], float), np.array(sb["score"]["histogram"], float)
    ca = np.cumsum(ha) / ha.sum() if ha.sum() else np.zeros_like(ha)
    cb = np.cumsum(hb) / hb.sum() if hb.sum() else np.zeros_like(hb)
    mean_a, mean_b = sa["score"]["mean"], sb["score"]["mean"]
    return {
        "output": store.uri, "a": ra["version"], "b": rb["version"],
        "status": delta(sa["status"], sb["status"]),
        "classes": delta(sa["classes"], sb["classes"]),
        "labels": {"a": sa["labels"], "b": sb["labels"], "change": sb["labels"] - sa["labels"]},
        "shards": {
            "in": sorted(set(items_b) - set(items_a)),
            "out": sorted(set(items_a) - set(items_b)),
            "relabelled": sorted(s for s in set(items_a) & set(items_b) if items_a[s] != items_b[s]),
        },
        "score": {"a": sa["score"], "b": sb["score"],
                  "mean_shift": None if mean_a is None or mean_b is None else mean_b - mean_a,
                  "ks_binned": float(np.abs(ca - cb).max()) if ha.sum() and hb.sum() else None,
                  "bins": SCORE_BINS.tolist()},
    }


def format_diff(d: dict) -> str:
    lines = [f"{d['output']}: version {d['a']} -> {d['b']}",
             f"shards in: {len(d['shards']['in'])}, out: {len(d['shards']['out'])}, "
             f"relabelled: {len(d['shards']['relabelled'])}",
             f"labels: {d['labels']['a']} -> {d['labels']['b']} ({d['labels']['change']:+d})", "status:"]
    lines += [f"  {k:12} {v['a']:>8} -> {v['b']:>8} ({v['change']:+d})" for k, v in d["status"].items()]
    lines.append("classes:")
    lines += [f"  {k:20} {v['a']:>8} -> {v['b']:>8} ({v['change']:+d})" for k, v in d["classes"].items()]
    s = d["score"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"score: mean {fmt(s['a']['mean'])} -> {fmt(s['b']['mean'])} (shift {fmt(s['mean_shift'])}), "
                 f"median {fmt(s['a']['p50'])} -> {fmt(s['b']['p50'])}, binned KS {fmt(s['ks_binned'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------ rollback
def rollback(output: str, version: int | str, storage_options: dict | None = None) -> dict:
    """Publish a new version equal to ``version`` (under the writer lock)."""
    store = existing_output(output, storage_options)
    with OutputLock(output, storage_options, command="rollback") as lock:
        store.repair()
        target = readable_record(store, version)
        lock.ensure_held()
        return store.rollback(target["version"], {"command": "rollback"})


# ------------------------------------------------------------------ vacuum
def _kept(records: list[dict], keep_versions: int | None, older_than_days: float | None,
          now: datetime) -> list[dict]:
    if keep_versions is not None:
        if keep_versions < 1:
            raise ValueError("--keep-versions must be at least 1")
        return records[-keep_versions:]
    cut = now - timedelta(days=float(older_than_days))
    newer = [r for r in records if datetime.fromisoformat(r["time"]) >= cut]
    older = [r for r in records if datetime.fromisoformat(r["time"]) < cut]
    # the version current at the cut-off stays readable: time travel to any moment within retention works
    return ([older[-1]] if older else []) + newer


def vacuum(output: str, *, keep_versions: int | None = None, older_than_days: float | None = None,
           apply: bool = False, storage_options: dict | None = None, now: datetime | None = None) -> dict:
    """Delete data files no kept version reads, and staging leftovers; a dry run unless ``apply``."""
    store = existing_output(output, storage_options)
    lock = OutputLock(output, storage_options, command="vacuum")
    lock.acquire()
    try:
        repaired = store.repair() if apply else {}  # an interrupted writer's leftovers first
        records = store.versions()
        if not records:
            return {"kept_versions": [], "vacuumed_versions": [], "files": [], "bytes": 0, "staging_files": 0,
                    "log_files": [], "log_bytes": 0, "applied": apply}
        kept = _kept(records, keep_versions, older_than_days, now or datetime.now(timezone.utc))
        keep_files: dict[str, set[str]] = {name: set() for name in store.tables}
        for rec in kept:
            for name, v in rec["table_versions"].items():
                keep_files[name].update(f["path"] for f in store.tables[name].files(v))
        doomed, size, staging = [], 0, int(repaired.get("staging_files", 0))
        for name, log in store.tables.items():
            if not store.fs.exists(log.path):
                continue
            for path, info in store.fs.find(log.path, detail=True).items():
                rel = posixpath.relpath(path, log.path)
                top = rel.split("/", 1)[0]
                if top == STAGING:
                    staging += 1
                    continue
                if top.startswith("_") or not rel.endswith(".parquet") or rel in keep_files[name]:
                    continue
                doomed.append(path)
                size += int(info.get("size") or 0)
        # the log entries and checkpoints only vacuumed versions read (a reader of a kept version starts from
        # the newest checkpoint at or before it); without this the logs grow with every night forever
        logs: list[tuple[str, int]] = []
        for name, log in store.tables.items():
            oldest = [rec["table_versions"][name] for rec in kept if name in rec["table_versions"]]
            if oldest and log.exists():
                logs += log.log_files_before(min(oldest))
        logs += store.versions_log_files_before_latest()
        kept_numbers = [r["version"] for r in kept]
        gone = sorted((store.vacuumed() | {r["version"] for r in records}) - set(kept_numbers))
        if apply:
            lock.ensure_held()
            path = posixpath.join(store.root, VACUUM_FILE)
            store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with store.fs.open(path, "w") as fh:  # first: a reader never opens a version losing its files
                json.dump({"vacuumed": gone}, fh)
            for p in doomed:
                store.fs.rm_file(p)
            for p, _ in logs:
                store.fs.rm_file(p)
            for log in store.tables.values():
                log.clear_staging()
        return {"kept_versions": kept_numbers, "vacuumed_versions": gone, "files": sorted(doomed), "bytes": size,
                "staging_files": staging, "log_files": [p for p, _ in logs], "log_bytes": sum(b for _, b in logs),
                "applied": apply}
    finally:
        lock.release()
