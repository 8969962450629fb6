"""A synthetic year of nightly refreshes through the real store code, measured as it grows (issue 22).

The output first receives ``--shards`` shards of ``--samples`` samples (label
rows of realistic size: ``--masks`` masks with RLE strings and ``--boxes``
boxes per image), committed in groups of ``--commit-every`` shards as a run
commits them: every shard's rows written by the worker-side table writer
(``OutputStore.stage_table``: one Parquet file per table and shard in
staging) and published by ``OutputStore.commit`` with its manifest.  Label
rows are synthetic; no teacher runs.

Then ``--nights`` nights.  Each night lists the input (fingerprints change
for 1 % of the shards, 0.5 % are new, 0.2 % are gone), asks the refresh
planner (``plan_refresh`` over the version records, as ``labelmill refresh``
does), writes the rows of the shards it must label, and commits the night
as one version (added shards, and the removal of changed and deleted
shards' old rows).

Every ``--every`` nights it measures: the night's plan + commit time on the
driver, ``labelmill.data.open`` of an early, a middle and the latest
version, one shard's labels read from a pinned early version, ``diff``
between version 1 and the latest, ``versions --json``, each table's Delta
log (JSON entries, checkpoints, bytes), live vs. total data files and
bytes, and the driver's peak RSS in the window.  At the end it runs
``vacuum`` (keeping the last ``--keep`` versions) and measures again.

Examples::

    python benchmarks/bench_year.py                                    # a tenth of the mission: 2,400 x 1,000
    python benchmarks/bench_year.py --shards 240 --samples 200 --out /tmp/year   # the 2-core VM run
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import resource
import shutil
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import psutil

from labelmill.io.shards import Fingerprint
from labelmill.schemas.tables import LABELS, SAMPLES, conform
from labelmill.store.commit import OutputStore
from labelmill.store.refresh_plan import LabelInputs, committed_from_records, inputs_key, plan_refresh

TODAY = LabelInputs(teachers={"maskclip": "0123456789abcdef", "glip": "fedcba9876543210"}, shared="0f0f0f0f",
                    filter={"min_score": 0.3, "per_class_min_score": {}, "min_area": 0.0,
                            "max_labels_per_image": None})
CLASSES = [f"class{i}" for i in range(80)]


def shard_url(root: str, i: int) -> str:
    return f"{root}/shards/shard-{i:06d}.tar"


def fingerprint(i: int, generation: int) -> Fingerprint:
    return Fingerprint(size=1_000_000 + i, mtime=str(1_700_000_000 + generation))


def synthetic_rows(shard: str, n: int, masks: int, boxes: int, rng: np.random.Generator, run_id: str):
    """(labels, samples) tables of one shard, shaped like the teachers' rows (RLE strings of ~200 bytes)."""
    keys = [f"{posixpath.basename(shard)[:-4]}-{j:06d}" for j in range(n)]
    per = masks + boxes
    k = n * per
    idx = np.repeat(np.arange(n), per)
    kind = np.tile(np.array(["mask"] * masks + ["box"] * boxes), n)
    cls = rng.integers(0, len(CLASSES), k)
    counts = ["".join(chr(48 + int(c)) for c in rng.integers(0, 75, 200)) for _ in range(min(k, 512))]
    seg = [{"size": [480, 640], "counts": counts[i % len(counts)]} if kind[i] == "mask" else None for i in range(k)]
    bbox = rng.uniform(0, 400, (k, 4)).astype(np.float32)
    labels = pa.table({
        "key": [keys[i] for i in idx], "shard": [shard] * k, "index": idx.astype(np.int64),
        "image_width": np.full(k, 640, np.int32), "image_height": np.full(k, 480, np.int32),
        "kind": kind, "class_id": cls.astype(np.int32), "class_name": [CLASSES[c] for c in cls],
        "phrase": [None] * k, "tokens_positive": [None] * k, "caption": [None] * k,
        "score": rng.uniform(0.3, 1.0, k).astype(np.float32), "bbox": list(bbox),
        "area": rng.uniform(100, 50_000, k), "segmentation": seg, "iscrowd": np.zeros(k, bool),
        "teacher": np.where(kind == "mask", "maskclip", "glip"), "teacher_type": np.where(kind == "mask", "maskclip", "glip"),
        "weights": ["ViT-B-16/openai"] * k, "weights_sha256": ["ab" * 32] * k, "teacher_config_hash": ["c" * 16] * k,
        "config_hash": ["h" * 16] * k, "run_id": [run_id] * k, "labelmill_version": ["0.1.0"] * k,
    })
    samples = pa.table({
        "key": keys, "shard": [shard] * n, "index": np.arange(n, dtype=np.int64),
        "image_width": np.full(n, 640, np.int32), "image_height": np.full(n, 480, np.int32),
        "caption": [f"a synthetic caption number {j}" for j in range(n)], "status": ["labelled"] * n,
        "error": [None] * n, "warnings": [[] for _ in range(n)], "num_labels": np.full(n, per, np.int32),
        "dropped_low_score": np.zeros(n, np.int32), "dropped_small_area": np.zeros(n, np.int32),
        "dropped_over_max": np.zeros(n, np.int32), "meta_json": ["{}"] * n, "teachers": [["maskclip", "glip"]] * n,
        "config_hash": ["h" * 16] * n, "run_id": [run_id] * n, "labelmill_version": ["0.1.0"] * n,
    })
    return conform(labels, LABELS), conform(samples, SAMPLES)


def manifest(store: OutputStore, shard: str, args, rng, run_id: str) -> dict:
    labels, samples = synthetic_rows(shard, args.samples, args.masks, args.boxes, rng, run_id)
    files = [store.stage_table("labels", labels), store.stage_table("samples", samples)]
    return {"files": files}


def item(shard: str, fp: Fingerprint) -> dict:
    return {"shard": shard, "fingerprint": fp.to_dict(), "inputs": inputs_key(TODAY), "dropped_small_area": 0,
            "dropped_over_max": 0}


def counts(n: int, per: int) -> dict:
    return {"samples": n, "labelled": n, "no_labels": 0, "error": 0, "labels_kept": n * per}


class PeakRSS:
    """The driver's peak resident memory in a window (a sampling thread, every 50 ms)."""

    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def take(self) -> int:
        peak, self.peak = self.peak, self.proc.memory_info().rss
        return peak


def log_stats(out: str) -> dict:
    """Per table: Delta log JSON entries, checkpoints and bytes; live vs. total data files and bytes."""
    from labelmill.data import open as open_version

    ds = open_version(out)
    stats = {}
    for table in ("labels", "samples", "stats", "_labelmill/versions"):
        log = os.path.join(out, table, "_delta_log")
        if not os.path.isdir(log):
            continue
        names = os.listdir(log)
        stats[table] = {"json": sum(n.endswith(".json") for n in names),
                        "checkpoints": sum(".checkpoint." in n for n in names),
                        "log_mb": round(sum(os.path.getsize(os.path.join(log, n)) for n in names) / 2**20, 2)}
        folder = os.path.join(out, table)
        data = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet")]
        stats[table]["files"] = len(data)
        stats[table]["mb"] = round(sum(os.path.getsize(p) for p in data) / 2**20, 1)
        if table in ("labels", "samples"):
            live = ds.paths(table)
            stats[table]["live_files"] = len(live)
            stats[table]["live_mb"] = round(sum(os.path.getsize(p) for p in live) / 2**20, 1)
    return stats


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(out: str, night: int, night_s: list[float], rss: PeakRSS, probe_shard: str) -> dict:
    import labelmill.data
    import pyarrow.compute as pc

    from labelmill.store.versions import describe_versions, diff_versions

    records = labelmill.data.versions(out)
    latest = records[-1]["version"]
    first_night = next((r["version"] for r in records if r.get("kind") == "refresh"), 1)
    row = {"night": night, "versions": latest, "night_s": round(float(np.median(night_s)), 3) if night_s else None}
    for name, v in (("open_early_s", 1), ("open_middle_s", max(1, latest // 2)), ("open_latest_s", latest)):
        _, row[name] = timed(lambda v=v: labelmill.data.open(out, version=v).paths("labels"))
    early = labelmill.data.open(out, version=1)
    got, row["shard_read_s"] = timed(lambda: early.read("labels", columns=["key", "score"],
                                                          filter=pc.field("shard") == probe_shard))
    row["shard_rows"] = got.num_rows
    _, row["diff_s"] = timed(lambda: diff_versions(out, first_night, latest))
    _, row["versions_json_s"] = timed(lambda: json.dumps(describe_versions(out), default=str))
    row["log"] = log_stats(out)
    row["peak_rss_mb"] = round(rss.take() / 2**20)
    return row


def plot_png(rows: list[dict], path: str) -> None:
    """A line plot (PIL: no plotting library needed) of the driver's seconds per night and per open of the
    latest version, and the peak RSS, against the night."""
    from PIL import Image, ImageDraw

    pts = [r for r in rows if not r.get("after")]
    series = {"night plan+commit (s)": [r.get("night_s") for r in pts], "open latest version (s)":
              [r["open_latest_s"] for r in pts], "diff first night-latest / 10 (s)": [r["diff_s"] / 10 for r in pts]}
    w, h, pad = 900, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    nights = [r["night"] for r in pts]
    top = max(v for vs in series.values() for v in vs if v is not None) * 1.1
    x = lambda n: pad + (w - 2 * pad) * n / max(1, max(nights))  # noqa: E731
    y = lambda v: h - pad - (h - 2 * pad) * v / top  # noqa: E731
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    for k in range(5):
        v = top * k / 4
        d.text((5, y(v) - 6), f"{v:.2f}", fill="black")
    for n in nights:
        d.text((x(n) - 8, h - pad + 5), str(n), fill="black")
    d.text((w // 2 - 20, h - 20), "night", fill="black")
    for (name, vs), colour in zip(series.items(), ("#c00", "#06c", "#090")):
        xy = [(x(n), y(v)) for n, v in zip(nights, vs) if v is not None]
        d.line(xy, fill=colour, width=2)
        d.text((pad + 10, 10 + 14 * list(series).index(name)), name, fill=colour)
    d.text((w - 330, 10), f"peak RSS {pts[1]['peak_rss_mb'] if len(pts) > 1 else '?'} -> {pts[-1]['peak_rss_mb']} MB "
           "(night 30 -> last)", fill="black")
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2400)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--masks", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=10)
    ap.add_argument("--commit-every", type=int, default=16)
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--rewrite", type=float, default=0.01)
    ap.add_argument("--add", type=float, default=0.005)
    ap.add_argument("--delete", type=float, default=0.002)
    ap.add_argument("--keep", type=int, default=14, help="versions vacuum keeps")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--plot", default=None, help="draw the growth as a PNG here")
    args = ap.parse_args()

    tmp = None if args.out else tempfile.mkdtemp(prefix="bench-year-")
    out = os.path.abspath(args.out or os.path.join(tmp, "out"))
    rng = np.random.default_rng(0)
    store = OutputStore(out)
    store.claim({"bench": "year"}, "h" * 16)
    rss = PeakRSS()
    listing = {shard_url(out, i): fingerprint(i, 0) for i in range(args.shards)}
    generation = {s: 0 for s in listing}
    next_id = args.shards
    t0 = time.perf_counter()
    shards = list(listing)
    for g in range(0, len(shards), args.commit_every):
        group = shards[g : g + args.commit_every]
        mans = [manifest(store, s, args, rng, "initial") for s in group]
        store.commit(mans, [item(s, listing[s]) for s in group], counts=counts(len(group) * args.samples,
                                                                              args.masks + args.boxes),
                     info={"label_inputs": {inputs_key(TODAY): TODAY.to_dict()}, "run_id": "initial"})
    initial_s = time.perf_counter() - t0
    probe = shards[0]
    rows = [{"night": 0, "initial_commit_s": round(initial_s, 1), **measure(out, 0, [], rss, probe)}]
    print(json.dumps(rows[-1]), flush=True)
    night_s: list[float] = []
    for night in range(1, args.nights + 1):
        alive = [s for s in listing if s != probe]
        n_rw = max(1, round(args.rewrite * len(listing)))
        n_add = max(1, round(args.add * len(listing)))
        n_del = max(1, round(args.delete * len(listing)))
        picks = rng.choice(len(alive), n_rw + n_del, replace=False)
        for i in picks[:n_rw]:
            s = alive[i]
            generation[s] += 1
            listing[s] = fingerprint(int(s[-10:-4]), generation[s])
        for i in picks[n_rw:]:
            listing.pop(alive[i])
        for _ in range(n_add):
            s = shard_url(out, next_id)
            listing[s], generation[s] = fingerprint(next_id, 0), 0
            next_id += 1
        run_id = f"night-{night}"
        t = time.perf_counter()
        records = store.versions()
        committed = committed_from_records(store.shard_items(records), store.label_inputs(records))
        plan = plan_refresh(listing, committed, TODAY)
        plan_s = time.perf_counter() - t
        todo = plan.to_label
        mans = [manifest(store, s, args, rng, run_id) for s in todo]  # the workers' part: not driver time
        t = time.perf_counter()
        store.commit(mans, [item(s, listing[s]) for s in todo], remove_shards=plan.to_remove,
                     counts=counts(len(todo) * args.samples, args.masks + args.boxes),
                     info={"label_inputs": {inputs_key(TODAY): TODAY.to_dict()}, "run_id": run_id}, kind="refresh")
        night_s.append(plan_s + time.perf_counter() - t)
        if night % args.every == 0 or night == args.nights:
            rows.append(measure(out, night, night_s, rss, probe))
            night_s = []
            print(json.dumps(rows[-1]), flush=True)
    from labelmill.store.versions import vacuum

    _, vac_s = timed(lambda: vacuum(out, keep_versions=args.keep, apply=True))
    rows.append({"night": args.nights, "after": "vacuum", "vacuum_s": round(vac_s, 2), "log": log_stats(out)})
    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}, fh, indent=2)
    if args.plot:
        plot_png(rows, args.plot)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
