"""COCO RLE of label maps from run lengths computed on the device.

A label map's per-class masks share one column-major run structure: a run
of equal labels is a run of ones in its class's mask and of zeros in every
other.  :func:`run_starts` finds the runs of a whole batch of label maps on
the device (one ``nonzero``), so only the run starts and their labels travel
to the host, not the maps.  :func:`class_rles` turns one map's runs into the
uncompressed COCO counts of each class and lets pycocotools compress them:
the strings equal ``pycocotools.mask.encode`` of each class's mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # the encoding side (class_rles) runs in the torch-free finish pool
    import torch


def run_starts(flat: "torch.Tensor", lengths: list[int]) -> "tuple[torch.Tensor, torch.Tensor]":
    """Start offsets of the runs of equal values in ``flat``, and their values.

    ``flat`` is the concatenation of segments of ``lengths`` (each a
    column-major flattened label map); a run never crosses a segment border.
    """
    import torch

    change = torch.ones_like(flat, dtype=torch.bool)
    if flat.numel() > 1:
        change[1:] = flat[1:] != flat[:-1]
    borders = np.cumsum([0, *lengths[:-1]])
    change[torch.as_tensor(borders, device=flat.device)] = True
    idx = change.nonzero().flatten()
    return idx, flat[idx]


def runs_to_counts(starts: np.ndarray, ends: np.ndarray, n: int) -> list[int]:
    """Uncompressed COCO counts (zeros first) of a mask of ``n`` pixels whose ones are the runs
    ``[starts[i], ends[i])`` (sorted, disjoint, not adjacent)."""
    if len(starts) == 0:
        return [n]
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[1:-1:2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = n - ends[-1]
    return counts[:-1].tolist() if counts[-1] == 0 else counts.tolist()


def class_rles(starts: np.ndarray, values: np.ndarray, hw: tuple[int, int], classes: list[int]) -> list[bytes]:
    """Compressed COCO RLE counts of each class in ``classes`` for one (H, W) label map given by its
    column-major run ``starts`` (from 0) and run ``values``."""
    if not classes:
        return []
    h, w = hw
    n = h * w
    ends = np.append(starts[1:], n)
    objs = []
    for k in classes:
        sel = values == k
        objs.append({"size": [h, w], "counts": runs_to_counts(starts[sel], ends[sel], n)})
    return [r["counts"] for r in mask_utils.frPyObjects(objs, h, w)]
