"""Throughput of GLIP inference: batched vs one image at a time.

Random weights (no checkpoint needed) and an offline tiny WordPiece
tokenizer; the architecture is either the tiny test config or the real GLIP-T
(or GLIP-L).  Timings include preprocessing and post-processing, i.e. they
measure ``GLIPPredictor.predict``.

Examples::

    python benchmarks/bench_glip.py                       # tiny + GLIP-T at min side 320
    python benchmarks/bench_glip.py --configs glip_t --min-size 800 --max-size 1333 --images 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from labelmill.models.glip import GLIP, GLIPConfig, GLIPPredictor, caption_prompt
from labelmill.models.glip.testing import build_tiny_tokenizer

CAPTIONS = [
    "A man riding a red bicycle next to a dog.",
    "two cats on the old wooden table",
    "a bus and three cars on the street",
    "the boy is holding a kite and a ball near the tree",
]


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs"


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_config(name: str, args, tokenizer) -> None:
    cfg = {"tiny": GLIPConfig.tiny, "glip_t": GLIPConfig.glip_t, "glip_l": GLIPConfig.glip_l}[name]()
    min_size = args.min_size if args.min_size else cfg.min_size
    max_size = args.max_size if args.max_size else max(cfg.max_size, int(min_size * 1333 / 800))
    torch.manual_seed(0)
    model = GLIP(cfg).eval()
    predictor = GLIPPredictor(
        model,
        tokenizer,
        device=args.device,
        min_size=min_size,
        max_size=max_size,
        max_batch_size=args.batch_size,
    )
    rng = np.random.default_rng(0)
    # Same size for all images, so they share padded shape and can be batched.
    images = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = [caption_prompt(CAPTIONS[i % len(CAPTIONS)]) for i in range(args.images)]
    prep = predictor.prepare(images[0])
    shape = predictor.padded_shape(prep.resized_size)

    predictor.predict(images[:1], prompts[:1])  # warm-up
    one_by_one = timed(lambda: [predictor.predict([im], [p]) for im, p in zip(images, prompts)], args.repeats)
    batched = timed(lambda: predictor.predict(images, prompts), args.repeats)
    n = len(images)
    print(
        f"{name:7s} input {args.height}x{args.width} -> resized {prep.resized_size[0]}x{prep.resized_size[1]}, "
        f"padded {shape[0]}x{shape[1]}, {n} images, batch {args.batch_size}: "
        f"one-by-one {n / one_by_one:7.2f} img/s ({one_by_one / n * 1000:8.1f} ms/img) | "
        f"batched {n / batched:7.2f} img/s ({batched / n * 1000:8.1f} ms/img) | speed-up {one_by_one / batched:4.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "glip_t"], choices=["tiny", "glip_t", "glip_l"])
    parser.add_argument("--min-size", type=int, default=None, help="short side after resize (default: config's, 320 for glip_t/l)")
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--height", type=int, default=480, help="input image height")
    parser.add_argument("--width", type=int, default=640, help="input image width")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    tokenizer = build_tiny_tokenizer()
    for name in args.configs:
        cfg_args = argparse.Namespace(**vars(args))
        if name != "tiny" and args.min_size is None:
            cfg_args.min_size = 320
        run_config(name, cfg_args, tokenizer)


if __name__ == "__main__":
    main()
