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

import gzip
import json
import lzma
import posixpath
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from braceexpand import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardListError(ValueError):
    """The input spec matched no shard, or could not be listed."""


class ShardUnavailable(RuntimeError):
    """A shard could not be opened or read to its end, even after retries (storage, not data, at fault)."""


#: defaults of :func:`iter_shard`'s retries (``input.read_attempts`` / ``input.read_backoff_s``)
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.5
_STORAGE_MODULES = frozenset({"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "fsspec", "s3fs",
                              "gcsfs", "adlfs", "http", "socket", "ssl"})


def is_transient(exc: BaseException) -> bool:
    """True for errors of the storage (I/O, network, timeouts), False for errors of the data.

    A truncated or corrupt tar, bad gzip or lzma data are the shard's own
    fault: retrying cannot help and they become error rows.  Everything the
    file system or the network raises (``OSError`` and its subclasses such as
    ``FileNotFoundError``, ``ConnectionResetError``, ``TimeoutError``, and the
    exceptions of the usual fsspec back-ends) is retried.
    """
    if isinstance(exc, (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, UnicodeError)):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in _STORAGE_MODULES


def storage_message(exc: BaseException, options_key: str) -> str:
    """One line for a storage error, with what to do about missing credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if "credential" in line.lower() or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        line += (f" (no usable credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or key and "
                 f"secret in {options_key})")
    return line


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
    duplicate_of: int | None = None  # index of the first sample with this key in the shard


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
    is an error naming the spec. The URLs of :func:`list_shard_fingerprints`
    (the one listing function; this drops the fingerprints).
    """
    return list(list_shard_fingerprints(spec, storage_options))


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a shard's bytes, taken from a listing.

    ``size`` always; ``etag`` where the store has one (S3, GCS); ``mtime`` as
    the store reports it (local: seconds as a decimal string, S3: the
    LastModified timestamp); ``sha256`` only when a content hash was asked
    for (it reads every byte of the shard).
    """

    size: int
    etag: str | None = None
    mtime: str | None = None
    sha256: str | None = None

    def same_content(self, other: "Fingerprint") -> bool:
        """True when both describe the same bytes, by the strongest field both have.

        Content hash first, then etag, then mtime; sizes must always agree.
        Two fingerprints with no such field in common cannot be told apart
        and count as different (the shard is relabelled, never wrongly kept).
        """
        if self.size != other.size:
            return False
        # unrolled (the planner asks once per listed shard every night)
        if self.sha256 is not None and other.sha256 is not None:
            return self.sha256 == other.sha256
        if self.etag is not None and other.etag is not None:
            return self.etag == other.etag
        if self.mtime is not None and other.mtime is not None:
            return self.mtime == other.mtime
        return False

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("size", self.size), ("etag", self.etag), ("mtime", self.mtime),
                                   ("sha256", self.sha256)) if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fingerprint":
        return cls(size=int(data["size"]), etag=data.get("etag"), mtime=data.get("mtime"),
                   sha256=data.get("sha256"))


def _fingerprint(info: dict[str, Any]) -> Fingerprint:
    etag = info.get("ETag", info.get("etag"))
    mtime = info.get("LastModified", info.get("mtime", info.get("updated")))
    if isinstance(mtime, float):
        mtime = f"{mtime:.6f}"
    elif mtime is not None and not isinstance(mtime, str):
        mtime = mtime.isoformat() if hasattr(mtime, "isoformat") else str(mtime)
    return Fingerprint(size=int(info.get("size") or 0), etag=etag.strip('"') if isinstance(etag, str) else None,
                       mtime=mtime)


def _is_file(info: dict[str, Any]) -> bool:
    return info.get("type", "file") == "file"


def _first(pair: tuple) -> Any:
    return pair[0]


def _sha256(url: str, storage_options: dict[str, Any]) -> str:
    import hashlib

    fs, path = _fs(url, storage_options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_shard_fingerprints(
    spec: str | list[str],
    storage_options: dict[str, Any] | None = None,
    *,
    content_hash: bool = False,
    hash_workers: int = 8,
) -> dict[str, Fingerprint]:
    """Like :func:`list_shards`, with each shard's :class:`Fingerprint`; same URLs, same order.

    Fingerprints come from the listings themselves: one ``find`` per
    folder or ``s3://`` prefix, one ``glob`` per pattern, and for the
    names a brace pattern expands to, one ``ls`` per parent folder however
    many names share it. No shard is ever stat'ed or HEAD-requested on its
    own. Listing caches are dropped first, so a shard rewritten since an
    earlier listing in the same process shows its new fingerprint.
    ``content_hash=True`` adds each shard's sha256, which reads every shard
    (``hash_workers`` at a time): use it where sizes and mtimes cannot be
    trusted (local copies that keep mtimes, stores without etags).
    """
    storage_options = storage_options or {}
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardListError("no input shards given")
    out: dict[str, Fingerprint] = {}
    invalidated: set[int] = set()
    parents: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}

    def parent_listing(fs, folder: str) -> dict[str, dict[str, Any]]:
        cache_key = (id(fs), folder)
        if cache_key not in parents:
            try:
                entries = fs.ls(folder, detail=True)
            except FileNotFoundError:
                entries = []
            parents[cache_key] = {e["name"].rstrip("/"): e for e in entries}
        return parents[cache_key]

    for item in specs:
        found: list[tuple[str, dict[str, Any]]] = []
        for url in braceexpand(item):
            fs, path = _fs(url, storage_options)
            if id(fs) not in invalidated:
                fs.invalidate_cache()
                invalidated.add(id(fs))
            try:
                if any(ch in url for ch in "*?["):
                    listed = fs.glob(path, detail=True)
                    matches = sorted(((p, i) for p, i in listed.items() if _is_shard(p) and _is_file(i)), key=_first)
                elif _is_shard(path):
                    entry = parent_listing(fs, posixpath.dirname(path.rstrip("/"))).get(path.rstrip("/"))
                    if entry is None:
                        matches = []
                    elif _is_file(entry):
                        matches = [(path, entry)]
                    else:  # a folder that happens to end in .tar
                        matches = sorted(((p, i) for p, i in fs.find(path, detail=True).items()
                                          if _is_shard(p)), key=_first)
                else:
                    matches = sorted(((p, i) for p, i in fs.find(path, detail=True).items()
                                      if _is_shard(p) and _is_file(i)), key=_first)
            except FileNotFoundError:
                matches = []
            except Exception as exc:  # noqa: BLE001 - storage errors become one line; anything else is a bug
                if not is_transient(exc):
                    raise
                raise ShardListError(f"cannot list {url!r}: {storage_message(exc, 'input.storage_options')}") from None
            found.extend((_with_protocol(m, url), info) for m, info in matches)
        if not found:
            raise ShardListError(f"input {item!r} matches no shard (*.tar, *.tar.gz, *.tgz)")
        for shard, info in found:
            if shard not in out:
                out[shard] = _fingerprint(info)
    if content_hash:
        from concurrent.futures import ThreadPoolExecutor

        urls = list(out)
        with ThreadPoolExecutor(max_workers=max(1, hash_workers)) as pool:
            digests = list(pool.map(lambda u: _sha256(u, storage_options), urls))
        for url, digest in zip(urls, digests):
            fp = out[url]
            out[url] = Fingerprint(size=fp.size, etag=fp.etag, mtime=fp.mtime, sha256=digest)
    return out


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


def json_sidecar_problem(text: str) -> str | None:
    """Why a ``KEY.json`` sidecar is unusable (teachers read its fields), or None."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return f"is JSON but not an object (a {type(value).__name__})"
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
            sample.duplicate_of = self.seen[key]
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
            problem = json_sidecar_problem(sample.meta)
            if problem:
                sample.warnings.append(f"{key}.json {problem}; stored verbatim, its fields are not used")
        reason = unsafe_key_reason(key)
        if reason and sample.error is None:
            sample.error = reason
        if error and sample.error is None:
            sample.error = error
        return sample


def iter_shard(url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = READ_ATTEMPTS,
               backoff_s: float = READ_BACKOFF_S, sleep=time.sleep) -> Iterator[RawSample]:
    """Stream the samples of one shard, member by member (constant memory).

    Storage errors (:func:`is_transient`: the shard missing for a moment, a
    5xx, a timeout, a connection dropped mid-shard) are retried up to
    ``attempts`` times with exponential backoff; a retry re-opens the shard
    and skips the samples already yielded.  When the retries are spent,
    :class:`ShardUnavailable` is raised: the shard is *failed*, not done.

    Data errors never raise.  A truncated or corrupt tar yields every sample
    completed before the damage; if the damage cut a member of the sample
    being assembled, that sample is the error row, otherwise one extra error
    row (keyed by the member being read, or "" when the damage hit a header)
    records where the shard broke.
    """
    emitted = 0
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        position = 0
        try:
            for sample in _read_once(url, storage_options or {}):
                position += 1
                if position <= emitted:
                    continue  # yielded by an earlier attempt
                emitted += 1
                yield sample
            return
        except Exception as exc:  # noqa: BLE001 - only storage errors get here (see _read_once)
            if attempt == attempts:
                raise ShardUnavailable(
                    f"cannot read shard {url} after {attempts} attempts ({emitted} samples read): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))


def _read_once(url: str, storage_options: dict[str, Any]) -> Iterator[RawSample]:
    """One pass over a shard; storage errors propagate (see :func:`iter_shard`), data errors become rows."""
    asm = _Assembler()
    try:
        fs, path = _fs(url, storage_options)
        handle = fs.open(path, "rb")
    except Exception as exc:  # noqa: BLE001
        if is_transient(exc):
            raise
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
    except Exception as exc:  # noqa: BLE001 - truncated tar, bad gzip (rows); storage errors (raised)
        if is_transient(exc):
            raise
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
