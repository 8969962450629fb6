"""Helpers shared by the tests: tiny model configs and synthetic shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def photo(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic RGB 'photo': smooth gradients plus a few coloured blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def good_sample(key: str, seed: int = 0, caption: str = "a red block on a gradient", w: int = 96, h: int = 64):
    return key, {"jpg": encode(photo(w, h, seed)), "txt": caption.encode(), "json": json.dumps({"seed": seed}).encode()}


def make_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "shard") -> list[str]:
    from labelmill.io.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [good_sample(f"{s:03d}{i:04d}", seed=s * 1000 + i) for i in range(per_shard)]
        paths.append(write_shard(str(folder / f"{prefix}-{s:05d}.tar"), samples))
    return paths


def tiny_maskclip(**overrides) -> dict:
    section = {
        "type": "maskclip",
        "pretrained": None,
        "arch_config": TINY_CLIP,
        "vocabulary": ["cat", "dog", "grass", "sky", "road"],
        "templates": "single",
        "image_size": 64,
        "whole_max_long_side": 128,
        "logit_scale": 100.0,
    }
    section.update(overrides)
    return section


def run_config(shards: str, out: str, **overrides) -> dict:
    cfg = {
        "input": {"shards": shards},
        "output": {"path": out, "commit_every_shards": 2},
        "teachers": [tiny_maskclip()],
        "ray": {"batch_size": 8},
        "allow_random_init": True,
        "progress_interval_s": 60,
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def rect_annotations(h: int, w: int, seed: int, n: int = 2) -> list[dict]:
    """Non-overlapping rectangle masks as COCO RLE, with categories."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    anns = []
    for j in range(n):
        m = np.zeros((h, w), np.uint8, order="F")
        x0 = j * w // n + int(rng.integers(0, w // (2 * n)))
        y0 = int(rng.integers(0, h // 2))
        m[y0 : y0 + h // 3, x0 : x0 + w // (2 * n)] = 1
        rle = mask_utils.encode(m)
        cid = int(rng.integers(1, 4))
        anns.append({"category": f"block{cid}", "category_id": cid,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    return anns


def gt_sample(key: str, seed: int, w: int = 96, h: int = 64):
    meta = {"annotations": rect_annotations(h, w, seed)}
    return key, {"png": encode(photo(w, h, seed), "PNG"), "txt": f"sample {key}".encode(),
                 "json": json.dumps(meta).encode()}


def gt_teacher(**kw) -> dict:
    return {"type": "plugin_teacher:GroundTruthTeacher", "name": "gt", **kw}


def write_config(tmp_path, cfg, name: str = "run.yaml") -> str:
    """A run config written as YAML; its path."""
    import yaml

    path = Path(tmp_path) / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line(capsys, prefix: str) -> str:
    """The one line a failed command printed on stderr (asserts it is one, with ``prefix``)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def samples_rows(shard: str, n: int):
    """``n`` samples-table rows of one shard (store tests that need no teacher)."""
    import pyarrow as pa

    from labelmill.schemas.tables import SAMPLES

    return pa.Table.from_pylist([{"key": f"{shard}-{i}", "shard": shard, "index": i, "status": "labelled"}
                                 for i in range(n)], schema=SAMPLES)


def commit_shard(store, shard: str, n: int, remove=()) -> dict:
    """Stage one shard's samples rows and commit them as one version, removing the ``remove`` shards."""
    staged = store.stage_table("samples", samples_rows(shard, n))
    return store.commit([{"files": [staged]}], [{"shard": shard, "fingerprint": {"size": n}}], remove_shards=remove)
