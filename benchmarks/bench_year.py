"""A synthetic year of nightly refreshes through the real store code, measured as it grows (issue 22).

The output first receives ``--shards`` shards of ``--samples`` samples (label
rows of realistic size: ``--masks`` masks with RLE strings and ``--boxes``
boxes per image; with ``--regions DIM`` also ViLD region rows of ``--boxes``
float16 embeddings of DIM per image), committed in groups of
``--commit-every`` shards as a run commits them: every shard's rows written
by the worker-side table writer (``OutputStore.stage_table``: one Parquet
file per table and shard in staging) and published by
``OutputStore.commit`` with its manifest.  Label rows are synthetic; no
teacher runs.

Then ``--nights`` nights.  Each night lists the input (fingerprints change
for 1 % of the shards, 0.5 % are new, 0.2 % are gone), asks the refresh
planner (``plan_refresh`` over the version records, as ``labelmill refresh``
does), writes the rows of the shards it must label, and commits the night
as one version (added shards, and the removal of changed and deleted
shards' old rows).  ``--optimize-every N`` runs ``labelmill optimize``
every N nights and ``--vacuum-every N`` runs ``labelmill vacuum
--keep-versions --keep`` every N nights (the maintenance a team would
schedule); both are off by default.

Every ``--every`` nights it measures: the night's plan + commit time on the
driver, ``labelmill.data.open`` of an early, a middle and the latest
version, one shard's labels read from a pinned early version, ``diff``
between version 1 and the latest, ``versions --json``, each table's Delta
log (JSON entries, checkpoints, bytes), live vs. total data files and
bytes, and the driver's peak RSS in the window.

At the end: what ``vacuum`` would leave at several retentions, then
``optimize`` (``--group-shards``), the same retentions again, ``--after``
more nights on the optimized output (the copy-on-write cost of group
files), and a real ``vacuum`` keeping ``--keep`` versions.

``--s3`` runs the same against moto's S3 server (in a subprocess that
counts the requests it serves, by method) and reports requests per night.

Examples::

    python benchmarks/bench_year.py                                    # a tenth of the mission: 2,400 x 1,000
    python benchmarks/bench_year.py --shards 240 --samples 100 --out /tmp/year   # quick
    python benchmarks/bench_year.py --shards 48 --samples 100 --nights 60 --s3   # S3 request counts
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
from labelmill.store.refresh_plan import LabelInputs, inputs_key, plan_refresh

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


def synthetic_regions(labels: pa.Table, samples: pa.Table, boxes: int, dim: int, rng) -> pa.Table:
    """ViLD-shaped region rows (one per image: ``boxes`` boxes and float16 embeddings of ``dim``)."""
    from labelmill.schemas.tables import regions_schema

    n = samples.num_rows
    schema = regions_schema(dim)
    emb = rng.standard_normal((n, boxes, dim)).astype(np.float16)
    box = rng.uniform(0, 400, (n, boxes, 4)).astype(np.float32)
    given = {
        "key": samples.column("key"), "shard": samples.column("shard"), "index": samples.column("index"),
        "image_width": samples.column("image_width"), "image_height": samples.column("image_height"),
        "boxes": pa.array(list(box.tolist())), "boxes_norm": pa.array(list((box / 640).tolist())),
        "scores": pa.array(rng.uniform(0, 1, (n, boxes)).astype(np.float32).tolist()),
        "sources": pa.array([["glip"] * boxes] * n),
        "embeddings": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim), boxes)
        .cast(schema.field("embeddings").type),
        "num_regions": pa.array(np.full(n, boxes, np.int32)), "mode": pa.array(["crop"] * n),
        "teacher": pa.array(["vild"] * n), "run_id": samples.column("run_id"),
    }
    cols = [given[f.name].cast(f.type) if f.name in given else pa.nulls(n, f.type) for f in schema]
    return pa.table(cols, schema=schema)


def manifest(store: OutputStore, shard: str, args, rng, run_id: str) -> dict:
    labels, samples = synthetic_rows(shard, args.samples, args.masks, args.boxes, rng, run_id)
    files = [store.stage_table("labels", labels), store.stage_table("samples", samples)]
    if args.regions:
        files.append(store.stage_table("regions", synthetic_regions(labels, samples, args.boxes, args.regions, rng)))
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


COUNTING_S3 = """
import json, logging, sys, threading
from collections import Counter
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
counts, lock = Counter(), threading.Lock()
app = DomainDispatcherApplication(create_backend_app)
def counting(environ, start_response):
    if environ.get("PATH_INFO") == "/__counts":
        with lock:
            body = json.dumps(dict(counts)).encode()
            counts.clear()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    query = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "")
    what = environ["REQUEST_METHOD"] + ("-list" if "list-type" in query or "delimiter" in query else "")
    kind = ("delta-checkpoint" if ".checkpoint." in path else "delta-last-checkpoint" if "_last_checkpoint" in path
            else "delta-json" if "_delta_log" in path else "state" if "_labelmill/state" in path
            else "data" if path.endswith(".parquet") else "other")
    with lock:
        counts[what] += 1
        counts[f"{what} {path.split('/')[3] if path.count('/') > 3 else ''} {kind}"] += 1
    return app(environ, start_response)
server = make_server("127.0.0.1", 0, counting, threaded=True)
print(f"ENDPOINT http://127.0.0.1:{server.server_port}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
"""


class CountingS3:
    """moto's S3 server in a subprocess that counts the requests it serves (``take()``: counts since last)."""

    def __init__(self):
        import subprocess
        import sys

        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        self.proc = subprocess.Popen([sys.executable, "-c", COUNTING_S3], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = next(line.split()[1] for line in self.proc.stdout if line.startswith("ENDPOINT "))
        self.options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}
        import s3fs

        s3fs.S3FileSystem(**self.options).mkdir("year")
        self.take()

    def take(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.endpoint + "/__counts") as r:
            return json.loads(r.read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def log_stats(out: str, so: dict | None = None) -> dict:
    """Per table: log entries, checkpoints and bytes; live vs. total data files and bytes (any filesystem)."""
    from labelmill.data import open as open_version

    ds = open_version(out, storage_options=so)
    fs = ds.store.fs
    fs.invalidate_cache()  # s3fs keeps listings (the same instance serves every store of these options)
    stats = {}
    for table in ("labels", "samples", "regions", "stats", "_labelmill/versions"):
        folder = posixpath.join(ds.store.root, table)
        if not fs.exists(folder):
            continue
        log = posixpath.join(folder, "_delta_log" if table != "regions" else "_manifest")
        entries = fs.ls(log, detail=True) if fs.exists(log) else []
        names = [posixpath.basename(e["name"]) for e in entries]
        stats[table] = {"json": sum(n.endswith(".json") and ".checkpoint." not in n for n in names),
                        "checkpoints": sum(".checkpoint." in n for n in names),
                        "log_mb": round(sum(int(e["size"] or 0) for e in entries) / 2**20, 2)}
        data = {e["name"]: int(e["size"] or 0) for e in fs.ls(folder, detail=True)
                if e["name"].endswith(".parquet")}
        stats[table]["files"] = len(data)
        stats[table]["bytes"] = sum(data.values())
        stats[table]["mb"] = round(stats[table]["bytes"] / 2**20, 1)
        if table in ("labels", "samples", "regions", "stats") and table in ds.table_names():
            live = ds.paths(table)
            stats[table]["live_files"] = len(live)
            stats[table]["live_bytes"] = sum(data.get(p, 0) for p in live)
            stats[table]["live_mb"] = round(stats[table]["live_bytes"] / 2**20, 1)
    return stats


def data_totals(stats: dict) -> dict:
    """Files and MB of the data tables, on storage and live, and their ratio."""
    tables = [t for t in ("labels", "samples", "regions", "stats") if t in stats]
    tot = {k: sum(stats[t].get(k, 0) for t in tables) for k in ("files", "bytes", "live_files", "live_bytes")}
    tot["mb"], tot["live_mb"] = round(tot["bytes"] / 2**20, 1), round(tot["live_bytes"] / 2**20, 1)
    tot["mb_ratio"] = round(tot["bytes"] / tot["live_bytes"], 3) if tot["live_bytes"] else None
    tot["files_ratio"] = round(tot["files"] / tot["live_files"], 3) if tot["live_files"] else None
    return tot


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(out: str, night: int, night_s: list[float], rss: PeakRSS, probe_shard: str, so: dict | None) -> dict:
    import labelmill.data
    import pyarrow.compute as pc

    from labelmill.store.versions import describe_versions, diff_versions

    gone = OutputStore(out, so).vacuumed()
    records = [r for r in labelmill.data.versions(out, storage_options=so) if r["version"] not in gone]
    latest, first = records[-1]["version"], records[0]["version"]  # the earliest version still readable
    first_night = next((r["version"] for r in records if r.get("kind") == "refresh"), first)
    row = {"night": night, "versions": latest, "night_s": round(float(np.median(night_s)), 3) if night_s else None,
           "early": first}
    middle = records[len(records) // 2]["version"]
    for name, v in (("open_early_s", first), ("open_middle_s", middle), ("open_latest_s", latest)):
        _, row[name] = timed(lambda v=v: labelmill.data.open(out, version=v, storage_options=so).paths("labels"))
    early = labelmill.data.open(out, version=first, storage_options=so)
    got, row["shard_read_s"] = timed(lambda: early.read_shard("labels", probe_shard, columns=["key", "score"]))
    row["shard_rows"] = got.num_rows
    # the same rows through a plain pyarrow filter over every file of the version (opens every footer)
    _, row["shard_filter_s"] = timed(lambda: early.read("labels", columns=["key", "score"],
                                                        filter=pc.field("shard") == probe_shard))
    _, row["diff_s"] = timed(lambda: diff_versions(out, first_night, latest, storage_options=so))
    _, row["versions_json_s"] = timed(lambda: json.dumps(describe_versions(out, storage_options=so), default=str))
    row["log"] = log_stats(out, so)
    row["totals"] = data_totals(row["log"])
    row["peak_rss_mb"] = round(rss.take() / 2**20)
    return row


def retention(out: str, keeps: list[int], so: dict | None) -> dict:
    """What ``vacuum --keep-versions K`` would leave of the data tables, per K (a dry run: nothing deleted)."""
    from labelmill.store.versions import vacuum

    totals = data_totals(log_stats(out, so))
    out_ = {}
    for k in keeps:
        dry = vacuum(out, keep_versions=k, apply=False, storage_options=so)
        files = totals["files"] - len(dry["files"])
        left = totals["bytes"] - dry["bytes"]
        out_[k] = {"files": files, "mb": round(left / 2**20, 1), "files_ratio": round(files / totals["live_files"], 3),
                   "mb_ratio": round(left / totals["live_bytes"], 3)}
    return {"live_files": totals["live_files"], "live_mb": totals["live_mb"], "keep": out_}


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
    key = "nights_peak_rss_mb" if "nights_peak_rss_mb" in pts[-1] else "peak_rss_mb"
    d.text((w - 360, 10), f"driver peak RSS {pts[1].get(key, '?') if len(pts) > 1 else '?'} -> {pts[-1][key]} MB "
           f"(night 30 -> last{', nights only' if key.startswith('nights') else ''})", fill="black")
    img.save(path)


class Year:
    """The synthetic input listing and the nights that change it."""

    def __init__(self, args, out: str, store: OutputStore, so: dict | None, rng, s3=None):
        self.args, self.out, self.store, self.so, self.rng, self.s3 = args, out, store, so, rng, s3
        self.listing = {shard_url(out, i): fingerprint(i, 0) for i in range(args.shards)}
        self.generation = {s: 0 for s in self.listing}
        self.next_id = args.shards
        self.probe = next(iter(self.listing))

    def initial(self) -> float:
        args, t0 = self.args, time.perf_counter()
        shards = list(self.listing)
        for g in range(0, len(shards), args.commit_every):
            group = shards[g : g + args.commit_every]
            mans = [manifest(self.store, s, args, self.rng, "initial") for s in group]
            self.store.commit(mans, [item(s, self.listing[s]) for s in group],
                              counts=counts(len(group) * args.samples, args.masks + args.boxes),
                              info={"label_inputs": {inputs_key(TODAY): TODAY.to_dict()}, "run_id": "initial"})
        return time.perf_counter() - t0

    def night(self, night: int) -> dict:
        """One night: change the listing, plan, write the shards' rows (the workers' part), commit.  Returns the
        driver's plan + commit seconds and the bytes the commit wrote beyond the workers' files."""
        args, rng, listing, store = self.args, self.rng, self.listing, self.store
        alive = [s for s in listing if s != self.probe]
        base = len(listing) if args.churn == "compound" else args.shards  # fixed: shares of the first listing
        n_rw = max(1, round(args.rewrite * base))
        n_add = max(1, round(args.add * base))
        n_del = max(1, round(args.delete * base))
        picks = rng.choice(len(alive), n_rw + n_del, replace=False)
        for i in picks[:n_rw]:
            s = alive[i]
            self.generation[s] += 1
            listing[s] = fingerprint(int(s[-10:-4]), self.generation[s])
        for i in picks[n_rw:]:
            listing.pop(alive[i])
        for _ in range(n_add):
            s = shard_url(self.out, self.next_id)
            listing[s], self.generation[s] = fingerprint(self.next_id, 0), 0
            self.next_id += 1
        run_id = f"night-{night}"
        t = time.perf_counter()
        state = store.state()  # as labelmill refresh plans: the latest snapshot and the records after it
        before = dict(state.latest["table_versions"]) if state.latest else {}
        committed = state.committed()
        plan = plan_refresh(listing, committed, TODAY)
        plan_s = time.perf_counter() - t
        todo = plan.to_label
        mans = [manifest(store, s, args, rng, run_id) for s in todo]  # the workers' part: not driver time
        worker_bytes = sum(f["bytes"] for m in mans for f in m["files"])
        t = time.perf_counter()
        rec = store.commit(mans, [item(s, listing[s]) for s in todo], remove_shards=plan.to_remove,
                           counts=counts(len(todo) * args.samples, args.masks + args.boxes),
                           info={"label_inputs": {inputs_key(TODAY): TODAY.to_dict()}, "run_id": run_id},
                           kind="refresh")
        seconds = plan_s + time.perf_counter() - t
        requests = self.s3.take() if self.s3 else None  # before the bench's own reads below
        added = 0
        for name, v in rec["table_versions"].items():  # every file the version added (workers' + rewrites)
            if name == "stats" or before.get(name) == v:
                continue
            prev = {f["path"] for f in store.tables[name].files(before[name])} if name in before else set()
            added += sum(int(f["size"]) for f in store.tables[name].files(v) if f["path"] not in prev)
        return {"seconds": seconds, "worker_mb": worker_bytes / 2**20, "rewrite_mb": max(0, added - worker_bytes) / 2**20,
                "requests": requests}


def continue_nights(args) -> None:
    """More nights on an output a year run left, in a process that does nothing else."""
    from labelmill.io.shards import Fingerprint

    out = os.path.abspath(args.out)
    state = OutputStore(out).state()  # the input listing is rebuilt from it
    # the nights' writer opens nothing before its first night (as a `labelmill refresh` process)
    year = Year(args, out, OutputStore(out), None, np.random.default_rng(1))
    year.listing = {s: Fingerprint.from_dict(it["fingerprint"]) for s, it in state.shards.items()}
    year.generation = {s: 1000 for s in year.listing}
    year.next_id = max(int(s[-10:-4]) for s in year.listing) + 1
    year.probe = sorted(year.listing)[0]
    proc = psutil.Process()
    seconds = []
    for i in range(args.continue_nights):
        done = year.night(state.version + i + 1)
        seconds.append(done["seconds"])
        print(json.dumps({"night": i + 1, "seconds": round(done["seconds"], 3),
                          "rss_mb": round(proc.memory_info().rss / 2**20)}), flush=True)
    # the first night pays what a fresh `labelmill refresh` process pays: the state snapshot, the tables' add
    # actions; the others are a writer that stays up
    warm = sorted(seconds[1:])
    print(json.dumps({"first_night_s": round(seconds[0], 3),
                      "later_nights_median_s": round(warm[len(warm) // 2], 3) if warm else None,
                      "peak_rss_mb": round(proc.memory_info().rss / 2**20)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2400)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--masks", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=10)
    ap.add_argument("--regions", type=int, default=0, metavar="DIM", help="also ViLD region rows of DIM")
    ap.add_argument("--commit-every", type=int, default=16)
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--rewrite", type=float, default=0.01)
    ap.add_argument("--add", type=float, default=0.005)
    ap.add_argument("--delete", type=float, default=0.002)
    ap.add_argument("--churn", choices=("compound", "fixed"), default="compound",
                    help="shares of tonight's listing (it grows 0.3 %% a night) or of the first one (same work "
                    "every night)")
    ap.add_argument("--optimize-every", type=int, default=0, metavar="N", help="optimize every N nights")
    ap.add_argument("--vacuum-every", type=int, default=0, metavar="N", help="vacuum (keep --keep) every N nights")
    ap.add_argument("--group-shards", type=int, default=16)
    ap.add_argument("--keep", type=int, default=14, help="versions vacuum keeps")
    ap.add_argument("--retentions", default="1,7,14", help="vacuum --keep-versions values measured (dry run)")
    ap.add_argument("--after", type=int, default=7, help="nights run after the final optimize")
    ap.add_argument("--no-final-optimize", action="store_true",
                    help="end with the retention dry runs and the vacuum only (no optimize, no nights after it)")
    ap.add_argument("--s3", action="store_true", help="moto S3 (counting requests) instead of local disk")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--plot", default=None, help="draw the growth as a PNG here")
    ap.add_argument("--continue-nights", type=int, default=0, metavar="N",
                    help="run N more nights on the existing --out in this fresh process, printing the driver's "
                    "seconds and RSS after each (the writer's memory without the measurements beside it)")
    args = ap.parse_args()
    if args.continue_nights:
        continue_nights(args)
        return

    from labelmill.store.optimize import optimize
    from labelmill.store.versions import vacuum

    s3 = CountingS3() if args.s3 else None
    so = s3.options if s3 else None
    tmp = None if (args.out or s3) else tempfile.mkdtemp(prefix="bench-year-")
    out = "s3://year/out" if s3 else os.path.abspath(args.out or os.path.join(tmp, "out"))
    keeps = [int(k) for k in args.retentions.split(",")]
    store = OutputStore(out, so)
    store.claim({"bench": "year"}, "h" * 16)
    rss = PeakRSS()
    year = Year(args, out, store, so, np.random.default_rng(0), s3)
    initial_s = year.initial()
    rows = [{"night": 0, "initial_commit_s": round(initial_s, 1), **measure(out, 0, [], rss, year.probe, so)}]
    if s3:
        rows[-1]["s3_requests_initial"] = s3.take()
    print(json.dumps(rows[-1]), flush=True)
    night_s: list[float] = []
    requests: list[dict] = []
    rewrite_mb: list[float] = []
    maintenance = []
    for night in range(1, args.nights + 1):
        if s3:
            s3.take()  # the measurements' and maintenance's requests are not a night's
        done = year.night(night)
        night_s.append(done["seconds"])
        rewrite_mb.append(done["rewrite_mb"])
        if s3:
            requests.append(done["requests"])
        if args.optimize_every and night % args.optimize_every == 0:
            res, sec = timed(lambda: optimize(out, group_shards=args.group_shards, storage_options=so))
            maintenance.append({"night": night, "optimize_s": round(sec, 2), "version": res["version"]})
            store = year.store = OutputStore(out, so)
        if args.vacuum_every and night % args.vacuum_every == 0:
            _, sec = timed(lambda: vacuum(out, keep_versions=args.keep, apply=True, storage_options=so))
            maintenance.append({"night": night, "vacuum_s": round(sec, 2)})
        if night % args.every == 0 or night == args.nights:
            nights_peak = round(rss.take() / 2**20)  # the nights (and maintenance) alone, before the measurements
            rows.append(measure(out, night, night_s, rss, year.probe, so))
            rows[-1]["nights_peak_rss_mb"] = nights_peak
            rows[-1]["rewrite_mb_per_night"] = round(float(np.mean(rewrite_mb)), 2)
            if s3:
                rows[-1]["s3_requests_per_night"] = {k: round(float(np.mean([r.get(k, 0) for r in requests])), 1)
                                                     for k in sorted({k for r in requests for k in r})}
                requests = []
            night_s, rewrite_mb = [], []
            print(json.dumps(rows[-1]), flush=True)
    end = {"night": args.nights, "after": "year", "retention_before_optimize": retention(out, keeps, so)}
    if args.no_final_optimize:
        args.after = -1
    res, sec = timed(lambda: optimize(out, group_shards=args.group_shards, storage_options=so,
                                      dry_run=args.no_final_optimize))
    end.update(optimize_s=round(sec, 2), optimize=res["tables"], retention_after_optimize=retention(out, keeps, so))
    if s3:
        end["s3_requests_optimize"] = s3.take()
    year.store = OutputStore(out, so)
    after = [year.night(args.nights + i) for i in range(1, args.after + 1)]
    end["after_optimize"] = {} if not after else {"nights": args.after,
                             "night_s": round(float(np.median([a["seconds"] for a in after])), 3),
                             "rewrite_mb_per_night": round(float(np.mean([a["rewrite_mb"] for a in after])), 2),
                             "worker_mb_per_night": round(float(np.mean([a["worker_mb"] for a in after])), 2),
                             "retention": retention(out, keeps, so)}
    _, vac_s = timed(lambda: vacuum(out, keep_versions=args.keep, apply=True, storage_options=so))
    end.update(vacuum_s=round(vac_s, 2), log=log_stats(out, so))
    end["totals"] = data_totals(end["log"])
    rows.append(end)
    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "maintenance": maintenance,
                       "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}, fh, indent=2)
    if args.plot:
        plot_png(rows, args.plot)
    if s3:
        s3.close()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
