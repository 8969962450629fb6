"""What a teacher's device work hands to the host: named ragged arrays, one batch at a time.

The ``infer`` stage runs a split teacher's forward and device
post-processing and copies the results back once per batch; the ``finish``
stage turns them into labels on a CPU worker (COCO RLE, label rows). Between
the two they travel as one Arrow column per teacher (``raw.<teacher>``):

* a :class:`RawBatch` is ``{name: flat array (N_total, *inner)}`` plus, per
  name, offsets ``(B + 1,)`` that cut the flat array into the batch's
  images; ``valid`` marks images the teacher produced nothing for (skipped,
  failed), which read back as ``None``;
* its Arrow form (:meth:`RawBatch.to_arrow`) is a struct column with one
  ``list<T>`` field per name (the inner shape in the field's metadata), null
  where ``valid`` is false. Building and reading it is a handful of
  vectorised calls per batch, never a Python loop over images, so the device
  process spends no per-image host time on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

RAW_PREFIX = "raw."
PREPARED_PREFIX = "prep."


def raw_column(teacher: str) -> str:
    """The column a split teacher's raw results travel in from ``infer`` to ``finish``."""
    return f"{RAW_PREFIX}{teacher}"


def prepared_column(teacher: str) -> str:
    """The column a teacher's host-side inputs travel in from ``prepare`` to ``infer`` (and ``finish``)."""
    return f"{PREPARED_PREFIX}{teacher}"


@dataclass
class RawBatch:
    """Per image of a batch, named arrays of any length (see the module docstring)."""

    arrays: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    valid: np.ndarray
    #: per image: objects that stay inside the device process (device tensors a later teacher of the same
    #: forward may read, e.g. MaskCLIP's dense features); never serialised
    extras: list[dict] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def get(self, name: str, i: int) -> np.ndarray:
        off = self.offsets[name]
        return self.arrays[name][off[i] : off[i + 1]]

    def counts(self, name: str) -> np.ndarray:
        return np.diff(self.offsets[name])

    # ------------------------------------------------------------ building
    @classmethod
    def from_counts(cls, arrays: dict[str, np.ndarray], counts: dict[str, Sequence[int] | np.ndarray],
                    valid: np.ndarray | Sequence[bool] | None = None, extras: list[dict] | None = None) -> "RawBatch":
        """From flat arrays and the number of rows each image owns in each of them."""
        offsets = {}
        n = None
        for name, c in counts.items():
            c = np.asarray(c, dtype=np.int64)
            n = len(c) if n is None else n
            if len(c) != n:
                raise ValueError(f"raw field {name!r} has counts for {len(c)} images, others for {n}")
            offsets[name] = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
            if offsets[name][-1] != len(arrays[name]):
                raise ValueError(f"raw field {name!r}: counts sum to {offsets[name][-1]}, array has "
                                 f"{len(arrays[name])} rows")
        n = n or 0
        valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return cls(dict(arrays), offsets, valid, extras)

    @classmethod
    def from_images(cls, per_image: Sequence[dict[str, np.ndarray] | None], template: dict[str, tuple]) -> "RawBatch":
        """From one dict of arrays per image (None: nothing for that image); ``template`` gives every
        field's (dtype, inner shape) so that empty batches keep their layout. A convenience for host-side
        code and tests: the device path builds flat arrays directly."""
        arrays, counts = {}, {}
        for name, (dtype, inner) in template.items():
            parts = [np.asarray(p[name], dtype=dtype).reshape(-1, *inner) for p in per_image if p is not None]
            arrays[name] = np.concatenate(parts) if parts else np.zeros((0, *inner), dtype=dtype)
            counts[name] = [0 if p is None else len(np.asarray(p[name]).reshape(-1, *inner)) for p in per_image]
        return cls.from_counts(arrays, counts, [p is not None for p in per_image])

    @classmethod
    def empty(cls, layout: dict[str, tuple], n: int) -> "RawBatch":
        """``n`` images with no result, fields as ``layout`` ({name: (dtype, inner shape)}) gives them."""
        zeros = np.zeros(n, np.int64)
        return cls.from_counts({k: np.zeros((0, *inner), dtype=dt) for k, (dt, inner) in layout.items()},
                               {k: zeros for k in layout}, np.zeros(n, dtype=bool))

    def scatter(self, rows: Sequence[int], n: int) -> "RawBatch":
        """The same results placed at batch rows ``rows`` of an ``n``-image batch (others invalid, empty)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = {}
        for name, off in self.offsets.items():
            counts = np.zeros(n, dtype=np.int64)
            counts[rows] = np.diff(off)
            offsets[name] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        valid = np.zeros(n, dtype=bool)
        valid[rows] = self.valid
        extras = None
        if self.extras is not None:
            extras = [{} for _ in range(n)]
            for r, e in zip(rows, self.extras):
                extras[int(r)] = e
        if len(rows) and np.any(np.diff(rows) <= 0):
            raise ValueError("scatter needs increasing rows")
        return RawBatch(self.arrays, offsets, valid, extras)

    def slice(self, start: int, stop: int) -> "RawBatch":
        """Images ``start:stop`` (vectorised: views of the flat arrays)."""
        arrays, offsets = {}, {}
        for k, off in self.offsets.items():
            arrays[k] = self.arrays[k][off[start] : off[stop]]
            offsets[k] = off[start : stop + 1] - off[start]
        extras = None if self.extras is None else self.extras[start:stop]
        return RawBatch(arrays, offsets, self.valid[start:stop], extras)

    def take(self, idx: Sequence[int]) -> "RawBatch":
        """The results of images ``idx`` only, in that order."""
        idx = [int(i) for i in idx]
        arrays = {k: (np.concatenate([self.get(k, i) for i in idx]) if idx else v[:0]) for k, v in self.arrays.items()}
        counts = {k: [int(self.offsets[k][i + 1] - self.offsets[k][i]) for i in idx] for k in self.arrays}
        extras = None if self.extras is None else [self.extras[i] for i in idx]
        return RawBatch.from_counts(arrays, counts, self.valid[idx], extras)

    @staticmethod
    def concat(parts: Sequence["RawBatch"]) -> "RawBatch":
        """Images of several batches, in order (all with the same fields)."""
        if len(parts) == 1:
            return parts[0]
        names = list(parts[0].arrays)
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in names}
        counts = {k: np.concatenate([p.counts(k) for p in parts]) for k in names}
        extras = None
        if any(p.extras is not None for p in parts):
            extras = [e for p in parts for e in (p.extras or [{} for _ in range(len(p))])]
        return RawBatch.from_counts(arrays, counts, np.concatenate([p.valid for p in parts]), extras)

    # --------------------------------------------------------------- Arrow
    def to_arrow(self) -> pa.StructArray:
        fields, children = [], []
        for name, flat in self.arrays.items():
            flat = np.ascontiguousarray(flat)
            inner = flat.shape[1:]
            width = int(np.prod(inner)) if inner else 1
            values = pa.array(flat.reshape(-1))
            child = pa.ListArray.from_arrays(pa.array((self.offsets[name] * width).astype(np.int32)), values)
            meta = {b"inner": ",".join(str(d) for d in inner).encode()}
            fields.append(pa.field(name, child.type, metadata=meta))
            children.append(child)
        mask = pa.array(~self.valid)
        return pa.StructArray.from_arrays(children, fields=fields, mask=mask)

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray) -> "RawBatch":
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        arrays, offsets = {}, {}
        for f in column.type:
            child = column.field(f.name)  # a struct's child: honours the struct's slice
            raw_inner = (f.metadata or {}).get(b"inner", b"")
            inner = tuple(int(d) for d in raw_inner.decode().split(",") if d)
            width = int(np.prod(inner)) if inner else 1
            off = child.offsets.to_numpy().astype(np.int64)
            values = child.values.to_numpy(zero_copy_only=False)
            arrays[f.name] = values[off[0] : off[-1]].reshape(-1, *inner)
            offsets[f.name] = (off - off[0]) // width
        return cls(arrays, offsets, valid)
