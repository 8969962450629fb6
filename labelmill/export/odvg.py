"""ODVG JSONL export of grounding labels (the format GroundingDINO-style trainers read).

One line per image with at least one box at the threshold::

    {"filename": KEY, "height": H, "width": W, "shard": URL,
     "grounding": {"caption": "...", "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "...",
                                                  "tokens_positive": [[s, e]], "score": 0.7}]}}

``filename`` is the sample key (images stay in their shards; ``shard``
says where).  Labels are streamed shard by shard from a pinned dataset
version.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow.compute as pc


def export_odvg(output: str, dest: str, *, version: int | str | None = None, teacher: str | None = None,
                threshold: float = 0.0, storage_options: dict | None = None) -> dict[str, Any]:
    import labelmill.data

    ds = labelmill.data.open(output, version, storage_options=storage_options)
    shards: set[str] = set()
    for batch in ds.iter_batches("samples", columns=["shard"]):
        shards.update(pc.unique(batch.column("shard")).to_pylist())
    images = regions = 0
    with fsspec.open(dest, "w", **(storage_options or {})) as fh:
        for shard in sorted(shards):
            flt = (pc.field("shard") == shard) & (pc.field("kind") == "box") & pc.field("caption").is_valid()
            if teacher is not None:
                flt &= pc.field("teacher") == teacher
            rows = ds.read("labels", columns=["key", "index", "image_width", "image_height", "caption", "phrase",
                                              "tokens_positive", "bbox", "score"], filter=flt).to_pylist()
            by_key: dict[str, list[dict]] = {}
            for r in rows:
                if (r["score"] or 0.0) >= threshold and r["tokens_positive"]:
                    by_key.setdefault(r["key"], []).append(r)
            for key in sorted(by_key, key=lambda k: by_key[k][0]["index"]):
                rs = by_key[key]
                record = {
                    "filename": key, "height": rs[0]["image_height"], "width": rs[0]["image_width"], "shard": shard,
                    "grounding": {"caption": rs[0]["caption"], "regions": [
                        {"bbox": [round(r["bbox"][0], 2), round(r["bbox"][1], 2), round(r["bbox"][0] + r["bbox"][2], 2),
                                  round(r["bbox"][1] + r["bbox"][3], 2)],
                         "phrase": r["phrase"], "tokens_positive": [[int(a), int(b)] for a, b in r["tokens_positive"]],
                         "score": round(float(r["score"]), 5)} for r in rs]},
                }
                fh.write(json.dumps(record) + "\n")
                images += 1
                regions += len(rs)
    return {"file": dest, "version": ds.version, "images": images, "regions": regions}
