"""ViLD region embeddings: regions/s in crop and dense mode, their agreement, bytes stored.

    python benchmarks/bench_vild.py --model ViT-B-32 --images 32 --regions 32
    python benchmarks/bench_vild.py --model ViT-B-16 --images 16 --regions 32 --device cuda

Images are COCO photos (../shared/data/coco128, synthetic if absent) at the
decoder's default crop-mode size (short side 800, long side at most 1333).
Each image gets ``--regions`` proposals: its ground-truth boxes first, then
random boxes, so every mode embeds the same regions.  Measured, all on the
same weights, batch size and threads:

* **crop**: ``ViLDEmbedder.predict`` in crop mode (1x + 1.5x crops, so two
  encoder passes per region), RoIAlign cutting included;
* **dense (own forward)**: dense mode running the value-path forward itself
  at ``--dense-size``;
* **dense (reusing MaskCLIP)**: the embedder's marginal cost when a MaskCLIP
  teacher at the same size already produced the features; the MaskCLIP
  forward itself is reported separately;
* **agreement**: cosine between the crop and dense embeddings of each
  region, and how often a region's dense embedding is closest to its own
  crop embedding among the regions of its image;
* **bytes per image** of the regions table as written (zstd Parquet).

Weights are random unless ``--pretrained`` names real ones, so the
agreement numbers describe random features unless real weights are given.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


def load_images(n: int, regions: int, short: int = 800, long: int = 1333):
    """(work pixels, original size, proposals xyxy in original pixels) per image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = sorted(glob.glob(str(COCO128 / "images" / "*.jpg")))
    gt: dict[str, list[list[float]]] = {}
    if files and (COCO128 / "instances.json").exists():
        coco = json.loads((COCO128 / "instances.json").read_text())
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            gt.setdefault(os.path.basename(names[ann["image_id"]]), []).append([x, y, x + w, y + h])
    out = []
    for i in range(n):
        if files:
            path = files[i % len(files)]
            img = Image.open(path).convert("RGB")
            boxes = list(gt.get(os.path.basename(path), []))
        else:
            img = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
            boxes = []
        w, h = img.size
        while len(boxes) < regions:
            bw, bh = rng.uniform(0.05, 0.8) * w, rng.uniform(0.05, 0.8) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append([x, y, x + bw, y + bh])
        s = min(short / min(w, h), long / max(w, h), 1.0)
        work = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR) if s < 1 else img
        out.append((np.asarray(work), (h, w), [list(map(float, b)) for b in boxes[:regions]]))
    return out


def batches(images, size: int):
    from labelmill.teachers.base import ImageBatch

    for start in range(0, len(images), size):
        part = images[start : start + size]
        side = max(max(a.shape[:2]) for a, _, _ in part)
        canvas = torch.zeros(len(part), side, side, 3, dtype=torch.uint8)
        for j, (a, _, _) in enumerate(part):
            canvas[j, : a.shape[0], : a.shape[1]] = torch.from_numpy(np.array(a))
        yield ImageBatch(
            canvas,
            [a.shape[:2] for a, _, _ in part],
            [hw for _, hw, _ in part],
            [None] * len(part),
            [f"img{start + j}" for j in range(len(part))],
            [{"proposals": b} for _, _, b in part],
        )


def timed(fn, batches_list, device):
    outs, start = [], time.perf_counter()
    for b in batches_list:
        outs.append(fn(b))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return outs, time.perf_counter() - start


def stored_bytes(outputs, keys, sizes, teacher: str) -> dict:
    """Write the regions table as the pipeline does and measure it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelmill.schemas.tables import Col, regions_array
    from labelmill.schemas.tables import TABLES
    from labelmill.stages.write import WriteTables

    prov = json.dumps({teacher: {"teacher": teacher, "teacher_type": "vild", "weights": "w",
                                 "weights_sha256": "random-init", "teacher_config_hash": "h"}})
    rows = pa.table({
        Col.KEY: keys, Col.SHARD: ["s"] * len(keys), Col.INDEX: list(range(len(keys))),
        Col.ORIG_H: pa.array([h for h, _ in sizes], pa.int32()), Col.ORIG_W: pa.array([w for _, w in sizes], pa.int32()),
        Col.PROVENANCE: [prov] * len(keys), Col.REGIONS: regions_array([[(teacher, o.regions)] for o in outputs]),
    })
    table = WriteTables("unused", {}, "zstd", "c", "r", "v").regions_table(rows)
    with tempfile.NamedTemporaryFile(suffix=".parquet") as fh:
        pq.write_table(table, fh.name, compression="zstd", row_group_size=TABLES["regions"].row_group_rows)
        size = os.path.getsize(fh.name)
    regions = int(sum(len(o.regions.boxes) for o in outputs))
    return {"bytes_per_image": round(size / len(keys)), "bytes_per_region": round(size / regions, 1),
            "regions_per_image": regions / len(keys)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="open_clip tag or file; default random init")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--regions", type=int, default=32, help="proposals per image")
    ap.add_argument("--batch", type=int, default=8, help="images per predict call")
    ap.add_argument("--crop-batch", type=int, default=128)
    ap.add_argument("--dense-size", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher
    from labelmill.teachers.vild import ViLDConfig, ViLDEmbedder

    allow = args.pretrained is None
    common = {"model": args.model, "pretrained": args.pretrained, "proposals": [{"meta_field": "proposals"}],
              "max_regions": args.regions, "nms_iou": 1.0, "min_box_size": 0}
    crop = ViLDEmbedder(ViLDConfig(**common, mode="crop", crop_batch_size=args.crop_batch), device, allow)
    dense = ViLDEmbedder(ViLDConfig(**common, mode="dense", dense_image_size=args.dense_size), device, allow)
    shared = ViLDEmbedder(ViLDConfig(**common, mode="dense", dense_features_from="maskclip"), device, allow)
    maskclip = MaskCLIPTeacher(MaskCLIPConfig(model=args.model, pretrained=args.pretrained, image_size=args.dense_size,
                                              vocabulary="coco-stuff-171", templates="single", logit_scale=100.0),
                               device, allow)

    images = load_images(args.images, args.regions)
    bl = list(batches(images, args.batch))
    for b in bl:
        b.canvas = b.canvas.to(device)
    n_regions = sum(len(b) for _, _, b in images)
    crop.predict(bl[0], {})  # warm-up (allocators, kernels)
    dense.predict(bl[0], {})

    # the encoder alone on ready-made crops: the floor crop mode cannot beat
    bare_n = min(256, 2 * n_regions)
    ready = torch.rand(bare_n, 3, crop.crop_size, crop.crop_size, device=device) * 255
    _, t_bare = timed(lambda x: crop.encode_crops(x), list(ready.split(args.crop_batch)), device)
    crop_out, t_crop = timed(lambda b: crop.predict(b, {}), bl, device)
    dense_out, t_dense = timed(lambda b: dense.predict(b, {}), bl, device)
    mc_out, t_mc = timed(lambda b: maskclip.predict(b, {}), bl, device)
    shared_out, t_shared = timed(lambda pair: shared.predict(pair[0], {"maskclip": pair[1]}),
                                 list(zip(bl, mc_out)), device)

    crop_flat = [o for batch in crop_out for o in batch]
    dense_flat = [o for batch in dense_out for o in batch]
    shared_flat = [o for batch in shared_out for o in batch]
    cos, top1, cos_shared = [], [], []
    for c, d, s in zip(crop_flat, dense_flat, shared_flat):
        ce = c.regions.embeddings.astype(np.float32)
        de = d.regions.embeddings.astype(np.float32)
        se = s.regions.embeddings.astype(np.float32)
        sim = de @ ce.T
        cos.extend(np.diag(sim).tolist())
        top1.extend((sim.argmax(axis=1) == np.arange(len(ce))).tolist())
        cos_shared.extend((se * ce).sum(1).tolist())

    keys = [f"img{i}" for i in range(len(images))]
    sizes = [hw for _, hw, _ in images]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "weights": args.pretrained or "random-init",
        "images": len(images),
        "regions": n_regions,
        "crop": {"seconds": round(t_crop, 2), "regions_per_s": round(n_regions / t_crop, 1),
                 "images_per_s": round(len(images) / t_crop, 2), "crops_per_region": len(crop.config.crop_scales),
                 "crops_per_s": round(len(crop.config.crop_scales) * n_regions / t_crop, 1),
                 "bare_encoder_crops_per_s": round(bare_n / t_bare, 1)},
        "dense_own_forward": {"seconds": round(t_dense, 2), "regions_per_s": round(n_regions / t_dense, 1),
                              "images_per_s": round(len(images) / t_dense, 2), "size": args.dense_size,
                              "speedup_vs_crop": round(t_crop / t_dense, 1)},
        "dense_reusing_maskclip": {"seconds": round(t_shared, 3), "regions_per_s": round(n_regions / t_shared, 1),
                                   "speedup_vs_crop": round(t_crop / t_shared, 1),
                                   "maskclip_forward_seconds": round(t_mc, 2)},
        "agreement_dense_vs_crop": {
            "mean_cosine": round(float(np.mean(cos)), 3),
            "median_cosine": round(float(np.median(cos)), 3),
            "own_crop_is_nearest": round(float(np.mean(top1)), 3),
            "chance_nearest": round(1 / args.regions, 3),
            "mean_cosine_reused_features": round(float(np.mean(cos_shared)), 3),
        },
        "stored": {"crop": stored_bytes(crop_flat, keys, sizes, "vild")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
