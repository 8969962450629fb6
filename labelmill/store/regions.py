"""Reading ViLD region embeddings back, and the text side of ViLD.

The ``regions`` table of an output folder holds one row per (image, region
teacher): the proposal boxes in pixels and normalised to [0, 1], their
scores and sources, and one float16 CLIP embedding per box.  Every reader
here reads one dataset version (``version=None``: the latest) through
:func:`labelmill.data.open`, so it sees exactly the files that version
names: files a crashed run left behind never are.

* :class:`RegionReader` returns one image's embeddings as NumPy/torch arrays
  without reading the table: it keeps a small key index (the ``key`` column
  only) and reads just the row group that holds the image.
* :class:`RegionDataset` is a torch ``IterableDataset`` for a ViLD training
  job: files are split across DataLoader workers and distributed ranks and
  read one row group at a time, so memory does not grow with the table.
* :func:`read_regions_ray` gives a Ray Data dataset over the same files.
* :func:`text_embeddings_table` builds the ViLD-text classifier: one
  prompt-ensemble CLIP text embedding per class of a vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelmill.store.read import open_version

META_COLUMNS = ("key", "shard", "index", "image_width", "image_height", "mode", "model", "pixel_scale", "teacher", "weights",
                "weights_sha256", "teacher_config_hash")


@dataclass
class ImageRegions:
    """Proposals and CLIP embeddings of one image from one region teacher."""

    key: str
    boxes: np.ndarray        # (N, 4) float32 xyxy, original pixels
    boxes_norm: np.ndarray   # (N, 4) float32, divided by (w, h, w, h)
    scores: np.ndarray       # (N,) float32
    sources: list[str]
    embeddings: np.ndarray   # (N, D) float16, L2-normalised
    meta: dict[str, Any]

    def torch(self, dtype=None) -> dict[str, Any]:
        """The arrays as torch tensors (embeddings in ``dtype``, default float16)."""
        import torch

        emb = torch.from_numpy(self.embeddings)
        return {
            "key": self.key,
            "boxes": torch.from_numpy(self.boxes),
            "boxes_norm": torch.from_numpy(self.boxes_norm),
            "scores": torch.from_numpy(self.scores),
            "embeddings": emb if dtype is None else emb.to(dtype),
            "sources": self.sources,
            **self.meta,
        }


def _fixed_lists(array: pa.Array, width: int) -> np.ndarray:
    """A list<fixed_size_list<T, width>> cell (one row) as an (N, width) array."""
    values = pc.list_flatten(array)
    flat = values.flatten() if isinstance(values, pa.FixedSizeListArray) else pc.list_flatten(values)
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def rows_to_regions(table: pa.Table) -> Iterator[ImageRegions]:
    """Every row of a regions table (or a slice of it) as :class:`ImageRegions`."""
    dim = table.schema.field("embeddings").type.value_type.list_size
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        meta = {c: row.column(c)[0].as_py() for c in META_COLUMNS if c in table.column_names}
        yield ImageRegions(
            key=meta.pop("key"),
            boxes=_fixed_lists(row.column("boxes").combine_chunks(), 4).astype(np.float32),
            boxes_norm=_fixed_lists(row.column("boxes_norm").combine_chunks(), 4).astype(np.float32),
            scores=pc.list_flatten(row.column("scores")).to_numpy().astype(np.float32),
            sources=pc.list_flatten(row.column("sources")).to_pylist(),
            embeddings=_fixed_lists(row.column("embeddings").combine_chunks(), dim).astype(np.float16),
            meta=meta,
        )


class RegionReader:
    """Random access to the committed region embeddings of an output folder."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None, *,
                 version: int | str | None = None):
        ds = open_version(output, version, storage_options=storage_options)
        if "regions" not in ds.table_names():
            raise FileNotFoundError(f"{output} version {ds.version} has no regions table "
                                    "(did the run include a vild teacher?)")
        self.version = ds.version
        self.fs = ds.store.fs
        self.files = ds.paths("regions")
        self._index: dict[str, list[tuple[str, str, tuple[int, int, int]]]] | None = None

    def _build_index(self) -> dict[str, list[tuple[str, str, tuple[int, int, int]]]]:
        """key -> [(teacher, shard, (file, row group, row))], from three narrow columns."""
        index: dict[str, list[tuple[str, str, tuple[int, int, int]]]] = {}
        for f, path in enumerate(self.files):
            with self.fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.num_row_groups):
                    part = pf.read_row_group(g, columns=["key", "teacher", "shard"]).to_pydict()
                    for r, (k, t, sh) in enumerate(zip(part["key"], part["teacher"], part["shard"])):
                        index.setdefault(k, []).append((t, sh, (f, g, r)))
        return index

    @property
    def index(self) -> dict[str, list[tuple[str, str, tuple[int, int, int]]]]:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def keys(self) -> list[str]:
        return sorted(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str, teacher: str | None = None, shard: str | None = None) -> ImageRegions:
        """One image's regions.

        ``teacher`` picks among several region teachers and ``shard`` among
        shards that reuse a key; either is needed only when the key alone is
        ambiguous.
        """
        hits = [h for h in self.index.get(key, []) if teacher in (None, h[0]) and shard in (None, h[1])]
        if not hits:
            raise KeyError(f"no regions for key {key!r}" + (f" from teacher {teacher!r}" if teacher else "")
                           + (f" in shard {shard!r}" if shard else ""))
        if len(hits) > 1:
            raise KeyError(f"key {key!r} is ambiguous: {sorted((t, sh) for t, sh, _ in hits)}; "
                           "pass teacher= and/or shard=")
        f, g, r = hits[0][2]
        with self.fs.open(self.files[f], "rb") as fh:
            group = pq.ParquetFile(fh).read_row_group(g)
        return next(rows_to_regions(group.slice(r, 1)))


try:  # torch is a dependency of labelmill, but keep this module importable without it
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover
    _IterableDataset = object  # type: ignore[assignment,misc]


class RegionDataset(_IterableDataset):
    """Streams ``ImageRegions.torch()`` dicts, one per image, for training.

    Files are dealt round-robin to (rank, DataLoader worker) pairs, so each
    image is seen once per epoch across a distributed job.  Pass ``rank`` and
    ``world_size`` explicitly, or leave them to ``torch.distributed``.
    """

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        *,
        teacher: str | None = None,
        version: int | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        embedding_dtype=None,
    ):
        self.output = output
        self.storage_options = storage_options
        self.teacher = teacher
        self.rank = rank
        self.world_size = world_size
        self.embedding_dtype = embedding_dtype
        reader = RegionReader(output, storage_options, version=version)
        self.version = reader.version
        self.files = reader.files

    def _my_files(self) -> list[str]:
        import torch

        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
            else:
                rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * nw + wid, world * nw
        return self.files[slot::slots]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fs, _ = fsspec.core.url_to_fs(self.output.rstrip("/"), **(self.storage_options or {}))
        for path in self._my_files():
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.num_row_groups):
                    group = pf.read_row_group(g)
                    if self.teacher is not None:
                        group = group.filter(pc.equal(group.column("teacher"), self.teacher))
                    for item in rows_to_regions(group):
                        yield item.torch(self.embedding_dtype)


def read_regions_ray(output: str, storage_options: dict[str, Any] | None = None, *,
                     version: int | str | None = None, **kwargs):
    """A Ray Data dataset over the region files of one dataset version (``ray.data.read_parquet``)."""
    return open_version(output, version, storage_options=storage_options).to_ray("regions", **kwargs)


# --------------------------------------------------------------------------
# Text side: the ViLD-text classifier
# --------------------------------------------------------------------------


def text_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("class_id", pa.int32()),
            pa.field("class_name", pa.string()),
            pa.field("synonyms", pa.list_(pa.string())),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("vocabulary", pa.string()),
            pa.field("num_templates", pa.int32()),
            pa.field("weights", pa.string()),
            pa.field("weights_sha256", pa.string()),
        ]
    )


def text_embeddings_table(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    vocabulary: Any = "coco-80",
    templates: Any = "maskclip85",
    *,
    arch_config: dict | None = None,
    allow_random_init: bool = False,
    cache_dir: str | None = None,
    device: str = "cpu",
    quick_gelu: bool | None = None,
) -> pa.Table:
    """One row per class: its L2-normalised prompt-ensemble CLIP text embedding.

    Each class name (and synonym) fills every template; the normalised
    embeddings are averaged and normalised again.  The table has no
    background row: ViLD learns its background embedding during training.
    """
    import open_clip
    import torch

    from labelmill.models.openclip import encode_text_trimmed, load_clip, register_arch
    from labelmill.teachers.vocab import load_templates, load_vocabulary, text_classifier

    clip, weights, _ = load_clip(model, pretrained, arch_config=arch_config, quick_gelu=quick_gelu,
                                 allow_random_init=allow_random_init, cache_dir=cache_dir)
    clip = clip.to(device).requires_grad_(False)
    arch = register_arch(arch_config) if arch_config is not None else model
    vocab = load_vocabulary(vocabulary)
    temps = load_templates(templates)
    with torch.inference_mode():
        emb = text_classifier(
            lambda tokens: encode_text_trimmed(clip, tokens),
            open_clip.get_tokenizer(arch),
            vocab,
            temps,
            cache_key=f"{weights.weights}:{weights.sha256}",
            device=torch.device(device),
        ).float().cpu().numpy()
    n, dim = emb.shape
    schema = text_embeddings_schema(dim)
    return pa.table(
        {
            "class_id": pa.array(np.arange(n, dtype=np.int32)),
            "class_name": pa.array(list(vocab.names), pa.string()),
            "synonyms": pa.array([list(s) for s in vocab.synonyms], pa.list_(pa.string())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            "vocabulary": pa.array([vocab.source] * n, pa.string()),
            "num_templates": pa.array([len(temps)] * n, pa.int32()),
            "weights": pa.array([weights.weights] * n, pa.string()),
            "weights_sha256": pa.array([weights.sha256] * n, pa.string()),
        },
        schema=schema,
    )
