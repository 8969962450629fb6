"""Export memory and speed: peak RSS must stay flat as the number of images grows.

Builds synthetic outputs of N images (tiny PNGs in WebDataset shards, a few
mask labels each, committed straight through ``OutputStore`` so no teacher
runs), then times each export in a fresh subprocess and reads its peak RSS.
The reader holds ``--samples-per-read`` samples' rows at a time, so peak RSS
should not grow with N once N exceeds it.

    python benchmarks/bench_export.py --images 20000 80000 --per-shard 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

CHILD = """
import json, resource, sys, time
from labelmill.export.base import run_export
fmt, out, dest, per_read, opts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
t = time.perf_counter()
m = run_export(fmt, out, dest, samples_per_read=per_read, **opts)
print(json.dumps({"seconds": time.perf_counter() - t, "images": m["images"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _table(schema: pa.Schema, n: int, values: dict) -> pa.Table:
    cols = [pa.array(values[f.name], f.type) if f.name in values else pa.nulls(n, f.type) for f in schema]
    return pa.table(cols, schema=schema)


def build(root: str, images: int, per_shard: int, labels_per_image: int = 3) -> str:
    from pycocotools import mask as mask_utils

    from labelmill.io.shards import write_shard
    from labelmill.schemas.tables import LABELS, SAMPLES, STATS
    from labelmill.store.commit import OutputStore

    png = _png()
    m = np.zeros((48, 64), np.uint8, order="F")
    m[5:30, 10:40] = 1
    rle = mask_utils.encode(m)
    seg = {"size": [48, 64], "counts": rle["counts"].decode()}
    out = os.path.join(root, "out")
    store = OutputStore(out)
    store.claim({"bench": True}, "bench")
    n_shards = (images + per_shard - 1) // per_shard
    for s in range(n_shards):
        shard = os.path.join(root, "shards", f"s-{s:05d}.tar")
        keys = [f"{s:05d}{i:05d}" for i in range(min(per_shard, images - s * per_shard))]
        write_shard(shard, [(k, {"png": png}) for k in keys])
        n = len(keys)
        samples = _table(SAMPLES, n, {"key": keys, "shard": [shard] * n, "index": list(range(n)),
                                      "image_width": [64] * n, "image_height": [48] * n,
                                      "status": ["labelled"] * n, "num_labels": [labels_per_image] * n})
        k = n * labels_per_image
        labels = _table(LABELS, k, {
            "key": [key for key in keys for _ in range(labels_per_image)], "shard": [shard] * k,
            "index": [i for i in range(n) for _ in range(labels_per_image)],
            "image_width": [64] * k, "image_height": [48] * k, "kind": ["mask"] * k,
            "class_id": [j % 2 for _ in range(n) for j in range(labels_per_image)],
            "class_name": [["cat", "dog"][j % 2] for _ in range(n) for j in range(labels_per_image)],
            "score": [0.9] * k, "bbox": [[10.0, 5.0, 30.0, 25.0]] * k, "area": [750.0] * k,
            "segmentation": [seg] * k, "teacher": ["t"] * k})
        stats = _table(STATS, 1, {"commit": [s], "samples": [n]})
        store.commit_group(s, [shard], samples, labels, [], stats, {"bench": True})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--samples-per-read", type=int, default=10000)
    args = ap.parse_args()
    runs = [("coco", {}), ("yolo", {"task": "detect", "images": "none"}), ("yolo", {"task": "segment", "images": "copy"}),
            ("fiftyone", {"images": "none"})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.images:
            root = os.path.join(tmp, f"n{n}")
            t = time.perf_counter()
            out = build(root, n, args.per_shard)
            print(f"built {n} images in {time.perf_counter() - t:.0f}s", file=sys.stderr)
            for fmt, opts in runs:
                dest = os.path.join(root, f"{fmt}-{len(rows)}")
                res = subprocess.run([sys.executable, "-c", CHILD, fmt, out, dest, str(args.samples_per_read),
                                      json.dumps(opts)], capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                assert r["images"] == n
                rows.append({"format": fmt, "options": opts, **r, "images_per_s": r["images"] / r["seconds"]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print("| images | export | seconds | images/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        opts = " ".join(f"--{k} {v}" for k, v in r["options"].items())
        print(f"| {r['images']} | {r['format']} {opts} | {r['seconds']:.1f} | {r['images_per_s']:.0f} "
              f"| {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
