"""``labelmill pack FOLDER OUT``: a plain folder of images -> WebDataset shards labelmill reads.

Every image under ``FOLDER`` (``.jpg``, ``.png``, ... at any depth, in sorted
path order) becomes one sample.  Its key is its path below ``FOLDER`` without
the extension, with dots in the file name turned into ``_`` (WebDataset cuts
a key at the first dot of the name).  A ``.txt`` file beside it with the same
stem is its caption, a ``.json`` file its metadata.  Samples go
``per_shard`` at a time into ``OUT/<prefix>-00000.tar, ...``, written one
shard at a time (memory holds one shard's bytes).  ``manifest.json`` beside
them lists each sample's key next to the file it came from.

Refused with one line: a missing folder, a folder without images, two
images that would get the same key (``a.jpg`` and ``a.png``), or an ``OUT``
that already holds shards.
"""

from __future__ import annotations

import json
import os
from typing import Any

from labelmill.io.shards import IMAGE_EXTS, ShardListError, unsafe_key_reason, write_shard


class PackError(ShardListError):
    """The folder cannot be packed as asked (one line, exit code 4)."""


def _images(folder: str) -> list[tuple[str, str, str]]:
    """(path, key, extension) of every image below ``folder``, in sorted path order."""
    found = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            if not dot or not stem or ext.lower() not in IMAGE_EXTS:
                continue
            rel_dir = os.path.relpath(dirpath, folder)
            key = stem.replace(".", "_")
            if rel_dir != ".":
                key = "/".join([*rel_dir.split(os.sep), key])
            found.append((os.path.join(dirpath, name), key, ext.lower()))
    return found


def pack_folder(folder: str, out: str, *, per_shard: int = 1000, prefix: str = "shard") -> dict[str, Any]:
    if per_shard < 1:
        raise PackError(f"--per-shard must be at least 1, not {per_shard}")
    if not os.path.isdir(folder):
        raise PackError(f"{folder} is not a folder")
    images = _images(folder)
    if not images:
        raise PackError(f"no images under {folder} (looked for .{', .'.join(IMAGE_EXTS)})")
    seen: dict[str, str] = {}
    for path, key, _ in images:
        if key in seen:
            raise PackError(f"{seen[key]} and {path} would both be sample {key!r}; rename one")
        reason = unsafe_key_reason(key)
        if reason:
            raise PackError(f"{path}: {reason}")
        seen[key] = path
    if os.path.isdir(out) and any(n.endswith(".tar") for n in os.listdir(out)):
        raise PackError(f"{out} already holds shards; choose an empty folder")
    os.makedirs(out, exist_ok=True)
    shards, captions, meta = [], 0, 0
    for start in range(0, len(images), per_shard):
        chunk = []
        for path, key, ext in images[start : start + per_shard]:
            with open(path, "rb") as fh:
                members = {ext: fh.read()}
            base = path[: -(len(ext) + 1)]
            for side in ("txt", "json"):
                if os.path.isfile(f"{base}.{side}"):
                    with open(f"{base}.{side}", "rb") as fh:
                        members[side] = fh.read()
            captions += "txt" in members
            meta += "json" in members
            chunk.append((key, members))
        name = f"{prefix}-{len(shards):05d}.tar"
        write_shard(os.path.join(out, name), chunk)
        shards.append(name)
    manifest = {"source": os.path.abspath(folder), "shards": shards, "images": len(images), "captions": captions,
                "json": meta, "per_shard": per_shard,
                "samples": [{"key": key, "file": os.path.relpath(path, folder)} for path, key, _ in images]}
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return {k: v for k, v in manifest.items() if k != "samples"} | {"out": os.path.abspath(out)}
