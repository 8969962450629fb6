"""The export framework: one pinned version, streamed sample by sample, into a format writer.

Every export is the same loop::

    source = ExportSource(output, version)          # labelmill.data.open(...): a pinned version
    dest = Destination(dest, overwrite=...)          # refuses an existing folder unless told
    writer = get_format(name)(dest, source, **opts)  # one file per format (coco, mdetr, yolo, fiftyone, odvg)
    for sample in source.samples(image_bytes=writer.wants_image_bytes):
        writer.add(sample)                           # one image with its labels, grouped by sample
    manifest = writer.close()

Memory stays flat in the number of images: the source reads the samples and
labels of a few shards at a time (``samples_per_read``), merges them by
``(shard, index)`` and, when a writer needs the pixels or the image's real
file name, walks the shard's tar alongside (one image in memory at a time).

**Adding a format** is one module ``labelmill/export/<name>.py`` holding a
:class:`Writer` subclass decorated with ``@register("<name>")``;
:func:`get_format` imports it on first use.  A writer gets each
:class:`Sample` (its labels are plain dicts with the ``labels`` table's
columns) and returns a JSON-able manifest from :meth:`Writer.close`.
Helpers every writer may use: :meth:`ExportSource.catalog` (classes per
teacher), :func:`select_teachers`, :func:`select_classes`,
:class:`ImageSink` (``--images link|copy|none``).

Errors a user can cause are :class:`ExportError` subclasses: one line each,
with the exit code the CLI returns (see the README's *Exports* section).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from labelmill.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_FAILED_SHARDS, EXIT_OUTPUT

# ------------------------------------------------------------------ errors


class ExportError(Exception):
    """A problem with the export's input or options: one line, an exit code."""

    exit_code = EXIT_ERROR


class ExportOptionError(ExportError):
    """An option names something the version does not have (class, teacher) or is malformed."""

    exit_code = EXIT_CONFIG


class NothingToExport(ExportError):
    """The version is empty, or every sample of it failed."""

    exit_code = EXIT_FAILED_SHARDS


class DestinationError(ExportError):
    """DEST exists (and ``--overwrite`` was not given), or cannot be written as asked."""

    exit_code = EXIT_OUTPUT


class DuplicateImageName(ExportError):
    """Two samples map to the same image name in the export folder."""

    exit_code = EXIT_OUTPUT


# ------------------------------------------------------------------ registry

FORMATS: dict[str, type["Writer"]] = {}


def register(name: str):
    def deco(cls: type[Writer]) -> type[Writer]:
        cls.format = name
        FORMATS[name] = cls
        return cls

    return deco


def get_format(name: str) -> type["Writer"]:
    if name not in FORMATS:
        try:
            importlib.import_module(f"labelmill.export.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"labelmill.export.{name}":
                raise
        if name not in FORMATS:
            raise ExportOptionError(f"unknown export format {name!r}")
    return FORMATS[name]


# ------------------------------------------------------------------ source

#: columns of the labels table the writers see
LABEL_COLUMNS = ["shard", "index", "teacher", "kind", "class_id", "class_name", "phrase", "tokens_positive",
                 "score", "bbox", "area", "segmentation"]
SAMPLE_COLUMNS = ["shard", "key", "index", "image_width", "image_height", "caption", "status"]


@dataclass
class Sample:
    """One image of the version with its labels (all teachers), ready for a writer."""

    image_id: int              # 1.. in (shard, index) order
    shard: str                 # the shard's URL as stored (absolute)
    key: str
    index: int
    width: int
    height: int
    caption: str | None
    file_name: str             # the image's name as in the shard (``KEY.ext``); the key if it is unknown
    labels: list[dict]
    image: bytes | None = None  # encoded image, when the writer asked for it and the shard still has it
    shard_name: str = ""       # the shard relative to ``ExportSource.shard_root`` (what exported files record)


@dataclass
class TeacherCatalog:
    """What one teacher's labels hold: class names (by class id) and whether it grounds phrases."""

    classes: dict[str, int]    # class name -> class id (vocabulary index)
    grounding: bool

    def ordered(self) -> list[str]:
        return sorted(self.classes, key=lambda n: (self.classes[n], n))


@dataclass
class SourceStats:
    samples: int = 0
    exported: int = 0
    skipped_errors: int = 0
    images_missing: int = 0   # samples whose image the shard no longer holds (file_name falls back to the key)
    status: dict[str, int] = field(default_factory=dict)


class ExportSource:
    """A pinned dataset version, streamed as :class:`Sample` objects."""

    def __init__(self, output: str, version: int | str | None = None, *, storage_options: dict | None = None,
                 samples_per_read: int = 50_000):
        import labelmill.data

        self.ds = labelmill.data.open(output, version, storage_options=storage_options)
        self.output = output
        self.output_uri = absolute_uri(output)
        self.version = self.ds.version
        self.storage_options = storage_options or {}
        self.samples_per_read = samples_per_read
        self.stats = SourceStats()
        self._catalog: dict[str, TeacherCatalog] | None = None
        self._registry = None
        self._has_labels = "labels" in self.ds.table_names()
        self._shards = self._scan()
        self.shard_root = common_root(self.shard_urls)

    def _scan(self) -> list[tuple[str, int]]:
        """Shards of the version with their sample counts, and counts by status (one streamed pass)."""
        per_shard: dict[str, int] = {}
        status: dict[str, int] = {}
        for batch in self.ds.iter_batches("samples", columns=["shard", "status"]):
            table = pa.Table.from_batches([batch])
            for row in table.group_by(["shard", "status"]).aggregate([([], "count_all")]).to_pylist():
                per_shard[row["shard"]] = per_shard.get(row["shard"], 0) + row["count_all"]
                status[row["status"]] = status.get(row["status"], 0) + row["count_all"]
        self.stats.status = status
        self.stats.samples = sum(status.values())
        return sorted(per_shard.items())

    def check_not_empty(self) -> None:
        where = f"version {self.version} of {self.output}"
        if self.stats.samples == 0:
            raise NothingToExport(f"{where} has no samples; nothing to export")
        if self.stats.status.get("error", 0) == self.stats.samples:
            raise NothingToExport(f"{where} is a failed version: all {self.stats.samples} samples are errors; "
                                  "nothing to export (see `labelmill report` for the reasons)")

    @property
    def shard_urls(self) -> list[str]:
        return [s for s, _ in self._shards]

    def catalog(self) -> dict[str, TeacherCatalog]:
        """Per teacher: its classes (name -> class id) and whether it has phrase (grounding) labels."""
        if self._catalog is not None:
            return self._catalog
        classes: dict[str, dict[str, int]] = {}
        grounding: set[str] = set()
        if self._has_labels:
            for batch in self.ds.iter_batches("labels", columns=["teacher", "class_id", "class_name", "phrase"]):
                table = pa.Table.from_batches([batch])
                table = table.append_column("phrase_only", pc.and_(pc.is_null(table["class_id"]),
                                                                    pc.is_valid(table["phrase"])))
                keys = table.group_by(["teacher", "class_name", "class_id", "phrase_only"]).aggregate([])
                for row in keys.to_pylist():
                    mine = classes.setdefault(row["teacher"], {})
                    if row["phrase_only"]:
                        grounding.add(row["teacher"])
                    if row["class_id"] is not None and row["class_name"] is not None:
                        name = row["class_name"]
                        mine[name] = min(mine.get(name, row["class_id"]), row["class_id"])
        self._catalog = {t: TeacherCatalog(c, t in grounding) for t, c in sorted(classes.items())}
        return self._catalog

    def registry(self):
        """The output's class registry (:mod:`labelmill.store.classes`): ids fixed when a class was first seen.

        Classes that labels name but no record registered (outputs written before the registry) are added
        here, for this export only, after the registered ones, teacher by teacher in class-id order.
        """
        if self._registry is None:
            from labelmill.store.classes import ClassRegistry

            reg = ClassRegistry.from_records(self.ds.store.versions())
            for cat in self.catalog().values():
                reg.extend(cat.ordered())
            self._registry = reg
        return self._registry

    # -------------------------------------------------------------- stream
    def _chunks(self) -> Iterator[list[str]]:
        chunk: list[str] = []
        rows = 0
        for shard, n in self._shards:
            chunk.append(shard)
            rows += n
            if rows >= self.samples_per_read:
                yield chunk
                chunk, rows = [], 0
        if chunk:
            yield chunk

    def samples(self, *, image_bytes: bool = False) -> Iterator[Sample]:
        """Every non-error sample of the version, in (shard, index) order, with its labels."""
        from labelmill.io.shards import iter_shard

        taken: set[str] = set()  # file names used so far (a name another shard used gets its shard's stem)
        image_id = 0
        sample_cols = SAMPLE_COLUMNS + (["image_name"] if "image_name" in self._sample_schema() else [])
        for chunk in self._chunks():
            where = pc.field("shard").isin(chunk)
            samples = self.ds.read("samples", columns=sample_cols, filter=where)
            samples = samples.sort_by([("shard", "ascending"), ("index", "ascending")])
            labels = self._labels(where)
            label_groups = _grouped(labels)
            pending = next(label_groups, None)
            for shard in chunk:
                rows = samples.filter(pc.equal(samples["shard"], shard))
                need_shard = image_bytes or "image_name" not in sample_cols
                raws = iter_shard(shard, self.storage_options) if need_shard else iter(())
                raw = next(raws, None)
                for batch in rows.to_batches(max_chunksize=4096):
                    for row in batch.to_pylist():
                        if need_shard:
                            while raw is not None and raw.index < row["index"]:
                                raw = next(raws, None)
                        here = raw if raw is not None and raw.index == row["index"] and raw.key == row["key"] else None
                        mine: list[dict] = []
                        while pending is not None and pending[0] <= (shard, row["index"]):
                            if pending[0] == (shard, row["index"]):
                                mine = pending[1]
                            pending = next(label_groups, None)
                        if row["status"] == "error":
                            self.stats.skipped_errors += 1
                            continue
                        image_id += 1
                        name = _unique_name(row.get("image_name") or (here.image_name if here is not None else None)
                                            or row["key"], shard, row["index"], taken)
                        if need_shard and (here is None or here.image is None):
                            self.stats.images_missing += 1
                        yield Sample(
                            image_id=image_id, shard=shard, key=row["key"], index=row["index"],
                            width=row["image_width"], height=row["image_height"], caption=row["caption"],
                            file_name=name, labels=mine,
                            image=here.image if (image_bytes and here is not None) else None,
                            shard_name=relative_to(shard, self.shard_root),
                        )
                if hasattr(raws, "close"):
                    raws.close()
        self.stats.exported = image_id

    def _sample_schema(self) -> list[str]:
        batches = self.ds.iter_batches("samples", batch_size=1)
        first = next(batches, None)
        return first.schema.names if first is not None else []

    def _labels(self, where) -> pa.Table:
        if not self._has_labels:
            return pa.table({"shard": pa.array([], pa.string()), "index": pa.array([], pa.int64())})
        schema = self.ds.schema("labels")
        extra = ["iscrowd"] if schema is not None and "iscrowd" in schema.names else []  # absent in older outputs
        labels = self.ds.read("labels", columns=LABEL_COLUMNS + extra, filter=where)
        return labels.sort_by([("shard", "ascending"), ("index", "ascending")])


def absolute_uri(path: str) -> str:
    """A local path made absolute (exports say where their source is, wherever they are read); URIs as given."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def common_root(urls: list[str]) -> str:
    """The deepest folder holding every shard (``s3://bucket/prefix`` or an absolute local folder)."""
    if not urls:
        return ""
    schemes = {u.split("://", 1)[0] if "://" in u else "" for u in urls}
    if len(schemes) > 1:
        return ""
    scheme = schemes.pop()
    paths = [u.split("://", 1)[1] if scheme else u for u in urls]
    root = posixpath.commonpath([posixpath.dirname(p) or "." for p in paths])
    return f"{scheme}://{root}" if scheme else root


def relative_to(url: str, root: str) -> str:
    """``url`` below ``root`` (``part-0001.tar``), or ``url`` itself when it is not below it."""
    if root and url.startswith(root.rstrip("/") + "/"):
        return url[len(root.rstrip("/")) + 1:]
    return url


def _grouped(labels: pa.Table) -> Iterator[tuple[tuple[str, int], list[dict]]]:
    """Labels sorted by (shard, index) -> ((shard, index), rows), a batch of dicts at a time."""
    key: tuple[str, int] | None = None
    rows: list[dict] = []
    for batch in labels.to_batches(max_chunksize=8192):
        for row in batch.to_pylist():
            k = (row["shard"], row["index"])
            if k != key:
                if key is not None:
                    yield key, rows
                key, rows = k, []
            rows.append(row)
    if key is not None:
        yield key, rows


# ------------------------------------------------------------------ options


def select_teachers(source: ExportSource, teachers: list[str] | None, *, need_classes: bool = False) -> list[str]:
    """The teachers to export: those asked for (each must have labels), else all."""
    cat = source.catalog()
    present = [t for t in cat if cat[t].classes or not need_classes]
    if not teachers:
        return present
    unknown = [t for t in teachers if t not in cat]
    if unknown:
        raise ExportOptionError(f"no labels from teacher(s) {unknown} in version {source.version} of "
                                f"{source.output}; teachers with labels: {sorted(cat) or 'none'}")
    return list(teachers)


def select_classes(source: ExportSource, classes: list[str] | None) -> list[str]:
    """Class names to export: those asked for (each must be a class of the output, labelled in this version
    or not), else all the output's classes, in registry order."""
    reg = source.registry()
    known = reg.names()
    if not classes:
        return known
    unknown = [c for c in classes if c not in reg]
    if unknown:
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise ExportOptionError(f"unknown class(es) {unknown}: no teacher of {source.output} has them "
                                f"(classes: {shown or 'none'})")
    return list(dict.fromkeys(classes))


def parse_version(text: str | None) -> int | str | None:
    """``--version``: a number, or an ISO timestamp (the version current at that time)."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else text


# ------------------------------------------------------------------ destination


class Destination:
    """The export folder: refused if it exists and is not empty (unless ``overwrite``), written through fsspec.

    ``manifest.json`` is written last; a failed export removes what it wrote.
    """

    def __init__(self, dest: str, *, overwrite: bool = False, output: str | None = None,
                 storage_options: dict | None = None):
        import fsspec

        self.uri = dest.rstrip("/") or dest
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.created = not self.fs.exists(self.root)
        if not self.created and self.fs.isdir(self.root) and not self.fs.ls(self.root, detail=False):
            return  # an empty folder is fine
        if not self.created:
            if not overwrite:
                raise DestinationError(f"{dest} already exists; pass --overwrite to replace it, or choose a new folder")
            if output is not None and self.local and _contains(self.root, output):
                raise DestinationError(f"refusing to overwrite {dest}: it holds the output {output} being exported")
            self.fs.rm(self.root, recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)

    def discard(self) -> None:
        """After a failed export: remove what was written (the folder too, if the export made it)."""
        if not self.fs.exists(self.root):
            return
        if self.created:
            self.fs.rm(self.root, recursive=True)
        else:
            for entry in self.fs.ls(self.root, detail=False):
                self.fs.rm(entry, recursive=True)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def open(self, rel: str, mode: str = "w"):
        target = self.path(rel)
        parent = posixpath.dirname(target)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        return self.fs.open(target, mode)

    def create(self, rel: str, data: bytes, what: str) -> None:
        """Write a new file; an existing one means two samples share a name."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with open(target, "xb") as fh:
                    fh.write(data)
            except FileExistsError:
                raise DuplicateImageName(_duplicate_message(rel, what)) from None
            return
        if self.fs.exists(target):
            raise DuplicateImageName(_duplicate_message(rel, what))
        with self.open(rel, "wb") as fh:
            fh.write(data)

    def write_json(self, rel: str, obj: Any, indent: int | None = 2) -> None:
        with self.open(rel, "w") as fh:
            json.dump(obj, fh, indent=indent)


def _duplicate_message(rel: str, what: str) -> str:
    return (f"two samples map to the same {what} {rel!r} (image names must be unique across the shards "
            "of a version to share one folder)")


def _contains(root: str, output: str) -> bool:
    out = os.path.realpath(output)
    top = os.path.realpath(root)
    return out == top or out.startswith(top.rstrip(os.sep) + os.sep)


IMAGE_MODES = ("link", "copy", "none")


def default_image_cache() -> str:
    return os.environ.get("LABELMILL_IMAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "labelmill",
                                                                   "images")


class ImageSink:
    """Puts each sample's image under ``<dest>/<folder>/<file_name>``: linked, copied, or not at all.

    ``copy`` writes the bytes from the shard.  ``link`` extracts each image
    once into a cache (``image_cache``, keyed by shard URL and file name) and
    hard-links it into the export (a symlink where a hard link cannot be
    made), so exports of several versions or tasks share one copy on disk.
    ``none`` writes no image: point the loader at your own image folder
    (``file_name`` is the image's real name).
    """

    def __init__(self, dest: Destination, mode: str, folder: str, image_cache: str | None = None):
        if mode not in IMAGE_MODES:
            raise ExportOptionError(f"--images must be one of {', '.join(IMAGE_MODES)}, not {mode!r}")
        if mode == "link" and not dest.local:
            raise DestinationError(f"--images link needs a local DEST ({dest.uri} is remote); use --images copy")
        self.dest, self.mode, self.folder = dest, mode, folder
        self.cache = image_cache or default_image_cache()
        self.written = 0
        self.missing = 0

    @property
    def wants_bytes(self) -> bool:
        return self.mode != "none"

    def put(self, sample: Sample, subfolder: str = "") -> None:
        if self.mode == "none":
            return
        if sample.image is None:
            self.missing += 1
            return
        rel = posixpath.join(self.folder, subfolder, sample.file_name)
        if self.mode == "copy":
            self.dest.create(rel, sample.image, "image")
        else:
            self._link(sample, rel)
        self.written += 1

    def _link(self, sample: Sample, rel: str) -> None:
        shard_dir = hashlib.sha1(sample.shard.encode()).hexdigest()[:16]
        cached = os.path.join(self.cache, shard_dir, sample.file_name)
        if not os.path.exists(cached) or os.path.getsize(cached) != len(sample.image):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(sample.image)
            os.replace(tmp, cached)
        target = self.dest.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(cached, target)
        except FileExistsError:
            raise DuplicateImageName(_duplicate_message(rel, "image")) from None
        except OSError:  # another filesystem, or links not allowed: fall back to a symlink
            try:
                os.symlink(os.path.abspath(cached), target)
            except FileExistsError:
                raise DuplicateImageName(_duplicate_message(rel, "image")) from None

    def report(self) -> dict:
        return {"mode": self.mode, "folder": self.folder, "written": self.written, "missing": self.missing,
                **({"cache": self.cache} if self.mode == "link" else {})}


# ------------------------------------------------------------------ writer + driver


class Writer:
    """One export format.  Subclasses set ``wants_image_bytes`` and implement ``add`` and ``close``."""

    format = "?"
    wants_image_bytes = False

    def __init__(self, dest: Destination, source: ExportSource, **options: Any):
        self.dest = dest
        self.source = source

    def add(self, sample: Sample) -> None:
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        raise NotImplementedError


def run_export(fmt: str, output: str, dest: str, *, version: int | str | None = None, overwrite: bool = False,
               storage_options: dict | None = None, samples_per_read: int = 50_000,
               **options: Any) -> dict[str, Any]:
    """Export version ``version`` of ``output`` to ``dest`` in format ``fmt``; returns the manifest."""
    writer_cls = get_format(fmt)
    source = ExportSource(output, version, storage_options=storage_options, samples_per_read=samples_per_read)
    source.check_not_empty()
    destination = Destination(dest, overwrite=overwrite, output=output, storage_options=storage_options)
    try:
        writer = writer_cls(destination, source, **options)
        for sample in source.samples(image_bytes=writer.wants_image_bytes):
            writer.add(sample)
        body = writer.close()
    except BaseException:
        destination.discard()  # no half-written export is left looking complete
        raise
    manifest = {
        "format": fmt,
        "source": source.output_uri,
        "version": source.version,
        "shard_root": source.shard_root,
        "version_time": source.ds.record.get("time"),
        "images": source.stats.exported,
        "skipped_error_samples": source.stats.skipped_errors,
        **body,
    }
    destination.write_json("manifest.json", manifest)
    return manifest


def _unique_name(name: str, shard: str, index: int, taken: set[str]) -> str:
    """``name``, or ``<shard stem>/<name>`` when an earlier image already has it: no two images share a file name."""
    if name in taken:
        stem = posixpath.basename(shard)
        for suffix in (".tar.gz", ".tgz", ".tar"):
            stem = stem.removesuffix(suffix)
        name = f"{stem}/{name}"
        if name in taken:
            name = f"{name}#{index}"
    taken.add(name)
    return name
