"""Training samples/s through the Ray Train data path against a bare PyTorch loop.

    python benchmarks/bench_train.py --images 32 --steps 40 --backbone tiny --image-size 128

Both sides train the same MaskCLIP+ student (same backbone, crop size,
batch size, optimizer, torch threads) on the same labelled images:

* **bare loop**: the augmented (image, class map) batches are prepared once
  and held in memory; a plain PyTorch loop runs forward/backward/step;
* **Ray Train**: ``labelmill.pipelines.train.train``: a pinned dataset
  version streamed from the tables and the original shards through Ray Data
  (read by key, decode, targets, augmentation) into one ``TorchTrainer``
  worker (``get_dataset_shard``), with per-step metrics and checkpoints.

Ray Train samples/s is the median of the per-step figures in the run's
metrics table (a step's time covers data wait, compute and reporting),
skipping the first ``--warmup`` steps; the bare loop's is timed the same
way.  The ratio (Ray / bare) is the figure of merit; goal >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--num-cpus", type=float, default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from helpers import make_shards, run_config
    from labelmill.config import load_config
    from labelmill.pipelines.label import run
    from labelmill.pipelines.train import train
    from labelmill.training.config import load_train_config
    from labelmill.training.loop import make_task, read_metrics
    from labelmill.training.maskclip_plus import prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    make_shards(tmp / "shards", args.shards, args.images // args.shards)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    run(load_config(run_config(str(tmp / "shards"), str(tmp / "out"))))
    cfg_dict = {
        "data": {"output": str(tmp / "out"), "image_size": args.image_size, "repeat": 4},
        "model": {"backbone": args.backbone},
        "optim": {"optimizer": "sgd", "lr": 0.01, "max_steps": args.steps, "batch_size": args.batch_size},
        "scaling": {"use_gpu": args.gpu, "cpus_per_worker": args.threads},
        "checkpoint": {"path": str(tmp / "runs"), "name": "bench", "every_steps": args.steps},
        "report_interval_s": 2.0,
    }
    cfg = load_train_config("maskclip-plus", cfg_dict)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(args.threads)

    # ---- bare loop, data in memory
    datasets, extra = prepare(cfg)
    rows = datasets["train"].take_all()  # benchmark only: the bare side holds everything in memory
    batches = [{"image": np.stack([r["image"] for r in rows[i:i + args.batch_size]]),
                "target": np.stack([r["target"] for r in rows[i:i + args.batch_size]])}
               for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
    task = make_task("maskclip-plus", cfg.model_dump(mode="json"), extra)
    model = task.build_model().to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    rates = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs = task.inputs(batches[step % len(batches)], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu):
            loss, _ = task.loss(model, inputs, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.gpu:
            torch.cuda.synchronize()
        rates.append(args.batch_size / (time.perf_counter() - t0))
    bare = float(np.median(rates[args.warmup:]))

    # ---- Ray Train data path
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    metrics = read_metrics(str(tmp / "runs"), "bench")
    ray_rate = float(np.median(metrics["samples_per_s"].iloc[args.warmup:]))
    out = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "device": str(device), "backbone": args.backbone, "image_size": args.image_size,
        "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
        "bare_samples_per_s": round(bare, 2), "ray_train_samples_per_s": round(ray_rate, 2),
        "ratio": round(ray_rate / bare, 3), "ray_train_wall_s_incl_startup": round(wall, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
