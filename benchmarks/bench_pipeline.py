"""Pipeline throughput against the bare teacher forward, and peak memory.

    python benchmarks/bench_pipeline.py --images 1024 --shards 16
    python benchmarks/bench_pipeline.py --memory   # 4 vs 40 shards, same shard size
    python benchmarks/bench_pipeline.py --images 256 --shards 4 --regions 300 --pipeline-only
        # MaskCLIP + ViLD dense at 300 regions/img: bytes the driver receives per image (on Ray)
    python benchmarks/bench_pipeline.py --images 256 --shards 4 --regions 300 --in-process-bytes
        # the same stages in one process: manifests now vs. labelled rows before, per image

Three numbers on the same images, batch size and torch threads:

* **bare forward**: MaskCLIP's dense forward plus the text classifier on
  already-decoded, already-normalised 224x224 batches (what a hand-written
  loop over open_clip would do);
* **teacher in-process**: ``MaskCLIPTeacher.predict`` on decoded batches,
  masks and RLE included, no Ray;
* **pipeline**: ``labelmill run`` end to end on local Ray: tar shards on
  disk -> read -> prepare -> infer -> finish -> filter -> Delta commits.  Reported as
  steady-state images/s (first to last committed sample) and as total wall
  time including Ray start-up and model load.

Peak memory is the peak, over the run, of the summed proportional set size
(PSS: shared pages split between processes, so Ray's shared-memory object
store is counted once) of the driver and every process it started.

Weights are random (no hub here); ``logit_scale`` 100 makes the score maps
as peaked as a trained CLIP's so mask post-processing does realistic work.
Images: the 128 COCO photos in ../shared/data/coco128 repeated, or
synthetic photos if that folder is absent.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import timed_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "images"


def photos() -> list[bytes]:
    files = sorted(glob.glob(str(COCO128 / "*.jpg")))
    if files:
        return [Path(f).read_bytes() for f in files]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(32):
        arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def random_boxes(rng, n: int, w: int = 640, h: int = 480) -> list[list[float]]:
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
    wh = rng.uniform(8, [w * 0.5, h * 0.5], (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h]), rng.uniform(0.1, 1, (n, 1))], 1).round(1).tolist()


def build_shards(folder: Path, n_images: int, n_shards: int, regions: int = 0) -> list[str]:
    from labelmill.io.shards import write_shard

    blobs = photos()
    rng = np.random.default_rng(0)
    per = -(-n_images // n_shards)
    paths, k = [], 0
    for s in range(n_shards):
        samples = []
        for _ in range(per):
            if k >= n_images:
                break
            members = {"jpg": blobs[k % len(blobs)], "txt": b"a photo"}
            if regions:  # external proposals, as an RPN would give them
                members["json"] = json.dumps({"proposals": random_boxes(rng, regions)}).encode()
            samples.append((f"{k:08d}", members))
            k += 1
        paths.append(write_shard(str(folder / f"bench-{s:05d}.tar"), samples))
    return paths


TEMPLATES = "maskclip85"


def teacher_section(arch: str, size: int) -> dict:
    return {
        "type": "maskclip",
        "model": arch,
        "pretrained": None,
        "vocabulary": "coco-stuff-171",
        "templates": TEMPLATES,
        "image_size": size,
        "logit_scale": 100.0,
    }


def bare_and_teacher(shards: list[str], arch: str, size: int, batch: int, threads: int) -> dict:
    """Decode every image once (not timed), then time the forward and the teacher."""
    import torch

    from labelmill.io.images import decode_image
    from labelmill.io.shards import iter_shard
    from labelmill.teachers.base import ImageBatch, ImageRequest
    from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher

    torch.set_num_threads(threads)
    teacher = MaskCLIPTeacher(MaskCLIPConfig(**teacher_section(arch, size)), torch.device("cpu"),
                              allow_random_init=True)
    request = ImageRequest(size, size)
    decoded = [decode_image(s.image, request, 10**9) for url in shards for s in iter_shard(url)]
    n = len(decoded)

    def image_batch(items):
        canvas = torch.zeros(len(items), size, size, 3, dtype=torch.uint8)
        for j, d in enumerate(items):
            h, w = d.pixels.shape[:2]
            canvas[j, :h, :w] = torch.from_numpy(d.pixels)
        return ImageBatch(canvas, [d.pixels.shape[:2] for d in items], [d.orig_hw for d in items],
                          [None] * len(items), [""] * len(items), [{}] * len(items))

    batches = [image_batch(decoded[i : i + batch]) for i in range(0, n, batch)]
    teacher.score_maps(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:  # forward and MaskCLIP head, no post-processing
        teacher.score_maps(b)
    bare = time.perf_counter() - start

    start = time.perf_counter()
    labels = 0
    for b in batches:
        labels += sum(len(o.labels) for o in teacher.predict(b, {}))
    taught = time.perf_counter() - start
    return {"images": n, "bare_forward_img_s": n / bare, "teacher_in_process_img_s": n / taught,
            "labels_per_image": labels / n}


def vild_section(arch: str, regions: int) -> dict:
    """ViLD dense regions pooled from MaskCLIP's features (same weights), ``regions`` proposals per image."""
    return {"type": "vild", "model": arch, "pretrained": None, "mode": "dense", "dense_features_from": "maskclip",
            "proposals": [{"meta_field": "proposals"}], "max_regions": regions, "nms_iou": 1.0}


def pipeline(shards_dir: Path, out: Path, arch: str, size: int, batch: int, threads: int,
             commit_every: int, budget_mb: int | None = None, regions: int = 0, decode: str = "tasks",
             pss: bool = False) -> dict:
    """One ``labelmill run``; ``pss`` samples PSS every 0.5 s (memory runs), else RSS and CPU every 2 s."""
    from labelmill.config import load_config

    cfg = load_config(
        {
            "input": {"shards": str(shards_dir)},
            "output": {"path": str(out), "commit_every_shards": commit_every},
            "teachers": [teacher_section(arch, size)] + ([vild_section(arch, regions)] if regions else []),
            "ray": {"batch_size": batch, "torch_threads": threads, "object_store_budget_mb": budget_mb,
                    "decode": decode},
            "allow_random_init": True,
            "progress_interval_s": 5,
        }
    )
    summary, wall, steady, mem = timed_run(cfg, pss=pss)
    return {
        "images": summary.counters.samples,
        "errors": summary.counters.error,
        "pipeline_steady_img_s": steady,
        "pipeline_wall_s": wall,
        "pipeline_wall_img_s": summary.counters.samples / wall,
        "driver_bytes_received": summary.bytes_received,
        "driver_bytes_per_image": summary.bytes_received / max(summary.counters.samples, 1),
        "stored_bytes_per_image": stored_bytes(out) / max(summary.counters.samples, 1),
        "regions_per_image": regions,
        "peak_pss_mb" if pss else "peak_summed_rss_mb": mem.peak / 2**20,
        "cpu_s_by_process": mem.cpu_by_process(),
        "peak_driver_rss_mb": mem.peak_driver_rss / 2**20,
        "peak_breakdown_mb": {k: round(v) for k, v in sorted(mem.breakdown.items(), key=lambda kv: -kv[1])},
        "plan": summary.plan,
    }


def driver_bytes_in_process(shards_dir: Path, out: Path, arch: str, size: int, batch: int, threads: int,
                            regions: int) -> dict:
    """The same stages without Ray: what reaches the driver now (manifests) vs. before (labelled rows).

    Runs read -> prepare -> infer -> finish -> filter -> write in this process on every
    shard and sums the Arrow bytes of the write stage's output (the manifest
    rows the engine's driver receives through ``iter_batches``) and of its
    input (the rows wave 1's driver-side writer received).
    """
    from labelmill.config import load_config
    from labelmill.pipelines.label import build_pipeline
    from labelmill.stages.base import Resources

    cfg = load_config({
        "input": {"shards": str(shards_dir)}, "output": {"path": str(out)},
        "teachers": [teacher_section(arch, size)] + ([vild_section(arch, regions)] if regions else []),
        "ray": {"batch_size": batch, "torch_threads": threads}, "allow_random_init": True,
    })
    p = build_pipeline(cfg, "bench")
    read, prepare, infer, finish, filt, write = (
        p.find(name=n) for n in ("read", "prepare", "infer", "finish", "filter", "write"))
    infer.place(Resources(cpus=threads), threads)
    infer.setup()
    finish.setup()
    write.setup()
    before = after = images = regions_seen = 0
    start = time.monotonic()
    for url in sorted(glob.glob(str(shards_dir / "*.tar"))):
        for block in read.read_blocks(url):
            decoded = prepare.process_batch(block)
            for i in range(0, decoded.num_rows, batch):
                rows = filt.process_batch(finish.process_batch(infer.process_batch(decoded.slice(i, batch))))
                before += rows.nbytes
                manifests = write.process_batch(rows)
                after += manifests.nbytes
                images += rows.num_rows
                for cell in rows.column("regions").to_pylist():
                    regions_seen += sum(len(r["boxes"]) for r in cell)
    return {"images": images, "regions_per_image_measured": regions_seen / max(images, 1),
            "bytes_per_image_before_rows_to_driver": before / max(images, 1),
            "bytes_per_image_now_manifests_to_driver": after / max(images, 1),
            "in_process_seconds": time.monotonic() - start}


def stored_bytes(out: Path) -> dict:
    import labelmill.data

    ds = labelmill.data.open(str(out))
    return sum(os.path.getsize(f) for t in ds.table_names() for f in ds.files(t))


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit-every", type=int, default=4)
    ap.add_argument("--memory", action="store_true", help="compare peak memory of 4 and 40 shards")
    ap.add_argument("--per-shard", type=int, default=25, help="images per shard in --memory mode")
    ap.add_argument("--budget-mb", type=int, default=None, help="ray.object_store_budget_mb (default: auto)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--regions", type=int, default=0,
                    help="add a ViLD dense teacher with this many proposals per image (driver bytes/img)")
    ap.add_argument("--pipeline-only", action="store_true", help="skip the bare-forward and teacher runs")
    ap.add_argument("--decode", choices=["tasks", "actor"], default="tasks", help="ray.decode of the pipeline run")
    ap.add_argument("--templates", default="maskclip85",
                    help="MaskCLIP prompt templates (short/single start faster; no effect on bytes)")
    ap.add_argument("--in-process-bytes", action="store_true",
                    help="driver bytes per image from the stages run in this process (no Ray)")
    args = ap.parse_args()
    global TEMPLATES
    TEMPLATES = args.templates
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="labelmill-bench-"))
    result: dict = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args)}
    try:
        if args.memory:
            for n in (4, 40):
                folder = work / f"shards-{n}"
                build_shards(folder, n * args.per_shard, n)
                res = pipeline(folder, work / f"out-{n}", args.arch, args.size, args.batch, args.threads,
                               args.commit_every, args.budget_mb, pss=True)
                result[f"{n}_shards"] = res
                print(json.dumps({n: res}), file=sys.stderr, flush=True)
            a, b = result["4_shards"]["peak_pss_mb"], result["40_shards"]["peak_pss_mb"]
            result["peak_ratio_40_vs_4"] = b / a
        else:
            folder = work / "shards"
            paths = build_shards(folder, args.images, args.shards, args.regions)
            if args.in_process_bytes:
                result.update(driver_bytes_in_process(folder, work / "out-inproc", args.arch, args.size, args.batch,
                                                      args.threads, args.regions))
                print(json.dumps(result, indent=2))
                return
            if not args.pipeline_only:
                # warm the text-embedding cache so every measurement starts from the same state
                result.update(bare_and_teacher(paths, args.arch, args.size, args.batch, args.threads))
                print(json.dumps(result), file=sys.stderr, flush=True)
            result.update(pipeline(folder, work / "out", args.arch, args.size, args.batch, args.threads,
                                   args.commit_every, args.budget_mb, args.regions, args.decode))
            if not args.pipeline_only:
                result["pipeline_vs_bare"] = result["pipeline_steady_img_s"] / result["bare_forward_img_s"]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
