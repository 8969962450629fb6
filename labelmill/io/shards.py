"""WebDataset shards: listing them and reading their samples, through fsspec.

Shards follow the img2dataset / webdataset convention: a tar file whose
members ``KEY.ext`` are grouped by ``KEY`` (everything before the first dot
of the file name, directories included) into samples.  ``KEY.jpg`` (or
jpeg/png/webp/...) is the image, ``KEY.txt`` the caption and ``KEY.json``
optional metadata.

The reader never aborts on a bad shard.  Every problem becomes a sample row
with its reason (see :class:`RawSample`), so that for every shard
``rows emitted == samples labelled + no_labels + error``.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from braceexpand import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardListError(ValueError):
    """The input spec matched no shard, or could not be listed."""


@dataclass
class RawSample:
    """One sample as read from a tar: still encoded."""

    key: str
    index: int
    image: bytes | None = None
    image_ext: str | None = None
    image_name: str | None = None  # the image member's name in the tar, as written (e.g. ``dir/0001.JPG``)
    caption: bytes | None = None
    meta: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def split_member(name: str) -> tuple[str | None, str | None]:
    """``dir/KEY.a.b`` -> (``dir/KEY``, ``a.b``): the webdataset grouping rule.

    The key is the member path up to the first dot of its file name; a
    file name without a dot belongs to no sample.  (Implemented here so the
    read workers need neither the webdataset package nor torch.)
    """
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext


def _fs(url: str, storage_options: dict[str, Any]):
    return fsspec.core.url_to_fs(url, **storage_options)


def _is_shard(path: str) -> bool:
    return path.endswith(SHARD_SUFFIXES)


def _with_protocol(path: str, template: str) -> str:
    """fsspec lists remote paths without their protocol; put it back."""
    if "://" in template and "://" not in path:
        return template.split("://", 1)[0] + "://" + path
    return path


def list_shards(spec: str | list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand a folder, glob, brace pattern, ``s3://`` prefix or list into shard URLs.

    The result is sorted within each spec and de-duplicated; an empty result
    is an error naming the spec.
    """
    storage_options = storage_options or {}
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardListError("no input shards given")
    out: list[str] = []
    for item in specs:
        found: list[str] = []
        for url in braceexpand(item):
            fs, path = _fs(url, storage_options)
            try:
                if any(ch in url for ch in "*?["):
                    matches = sorted(p for p in fs.glob(path) if _is_shard(p))
                elif fs.isdir(path):
                    matches = sorted(p for p in fs.find(path) if _is_shard(p))
                elif fs.exists(path):
                    matches = [path]
                else:
                    matches = []
            except (OSError, PermissionError) as exc:
                raise ShardListError(f"cannot list {url!r}: {type(exc).__name__}: {exc}") from exc
            found.extend(_with_protocol(m, url) for m in matches)
        if not found:
            raise ShardListError(f"input {item!r} matches no shard (*.tar, *.tar.gz, *.tgz)")
        out.extend(found)
    seen: set[str] = set()
    unique = []
    for url in out:
        if url not in seen:
            seen.add(url)
            unique.append(url)
    return unique


def unsafe_key_reason(key: str) -> str | None:
    """Why a sample key cannot be used as a relative path, or None if it can."""
    if not key:
        return "empty key"
    if key.startswith("/") or "\\" in key:
        return f"unsafe key {key!r}: absolute or backslash path"
    if any(part in ("..", ".") for part in key.split("/")):
        return f"unsafe key {key!r}: contains a '.' or '..' path segment"
    if "\x00" in key:
        return "unsafe key: contains NUL"
    return None


class _Assembler:
    """Groups tar members into samples and applies the per-sample rules."""

    def __init__(self) -> None:
        self.index = 0
        self.seen: dict[str, int] = {}
        self.key: str | None = None
        self.files: dict[str, bytes] = {}
        self.names: dict[str, str] = {}

    def add(self, key: str, ext: str, data: bytes, name: str | None = None) -> RawSample | None:
        flushed = None
        if self.key is not None and (key != self.key or ext in self.files):
            flushed = self.flush()
        self.key = key
        self.files[ext] = data
        if name is not None:
            self.names[ext] = name
        return flushed

    def flush(self, error: str | None = None) -> RawSample | None:
        if self.key is None:
            return None
        key, files, names = self.key, self.files, self.names
        self.key, self.files, self.names = None, {}, {}
        sample = RawSample(key=key, index=self.index)
        self.index += 1
        if key in self.seen:
            sample.error = f"duplicate key {key!r} in shard (first at index {self.seen[key]})"
        else:
            self.seen[key] = sample.index
        images = [e for e in IMAGE_EXTS if e in files]
        if images:
            sample.image_ext = images[0]
            sample.image = files[images[0]]
            sample.image_name = names.get(images[0])
            if len(images) > 1:
                sample.warnings.append(f"several images {images}; used .{images[0]}")
        elif sample.error is None:
            sample.error = f"no image member (found: {', '.join(sorted(files)) or 'nothing'})"
        sample.caption = files.get("txt")
        if "json" in files:
            sample.meta = files["json"].decode("utf-8", errors="replace")
        reason = unsafe_key_reason(key)
        if reason and sample.error is None:
            sample.error = reason
        if error and sample.error is None:
            sample.error = error
        return sample


def iter_shard(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[RawSample]:
    """Stream the samples of one shard, member by member (constant memory).

    A shard that cannot be opened yields one error row.  A truncated or
    corrupt tar yields every sample completed before the damage; if the
    damage cut a member of the sample being assembled, that sample is the
    error row, otherwise one extra error row (keyed by the member being read,
    or "" when the damage hit a header) records where the shard broke.
    """
    asm = _Assembler()
    try:
        fs, path = _fs(url, storage_options or {})
        handle = fs.open(path, "rb")
    except Exception as exc:  # missing file, permissions, endpoint down
        yield RawSample(key="", index=0, error=f"cannot open shard: {type(exc).__name__}: {exc}")
        return
    members = 0
    reading: str | None = None  # key of the member whose data is being read
    try:
        with handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name = info.name[2:] if info.name.startswith("./") else info.name
                if posixpath.basename(name).startswith("__"):
                    continue
                key, ext = split_member(name)
                if key is None:
                    continue  # not part of any sample (no extension)
                reading = key
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                reading = None
                members += 1
                done = asm.add(key, ext.lower(), data, name)
                if done is not None:
                    yield done
    except Exception as exc:  # truncated tar, bad gzip, dropped connection
        reason = f"shard broken after {members} complete members: {type(exc).__name__}: {exc}"
        if reading is not None and reading == asm.key:
            # the sample being assembled lost a member: it is incomplete
            yield asm.flush(error=reason)
            return
        done = asm.flush()
        if done is not None:
            yield done
        yield RawSample(key=reading or "", index=asm.index, error=reason)
        return
    last = asm.flush()
    if last is not None:
        yield last


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]], storage_options: dict | None = None) -> str:
    """Write ``[(key, {ext: bytes})]`` as a webdataset tar (members in order)."""
    import io

    fs, target = _fs(path, storage_options or {})
    parent = posixpath.dirname(target)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(target, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path
