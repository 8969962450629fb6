"""RLE mask -> one polygon (Ultralytics segmentation format), exact to the pixel edges.

Each 4-connected component's outer boundary is traced along pixel edges (a
mask pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), so the polygon's
vertices are exact pixel corners and a point-in-polygon test at pixel
centres gives the (hole-filled) mask back.  Holes are not representable in the
Ultralytics format and are filled.  Several components become one polygon
joined by zero-width bridges walked out and back (the approach YOLO
converters use for multi-part COCO masks), so the polygon's filled area is
the union of the parts.  Collinear points are dropped; no vertex moves.
"""

from __future__ import annotations

import numpy as np


def decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": [int(v) for v in rle["size"]],
                              "counts": counts.encode() if isinstance(counts, str) else counts})


def _boundary_loops(component: np.ndarray) -> list[np.ndarray]:
    """Closed loops of pixel edges around a filled component, as (N, 2) x, y vertices.

    Every mask pixel ``(r, c)`` whose neighbour across a side is background
    contributes that side as a directed edge, walking each pixel clockwise
    (y down); the edges chain into loops.  Where the boundary touches itself
    at a corner, the walk turns towards the interior, so the loop stays simple.
    """
    m = np.pad(component.astype(bool), 1)
    core = m[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(mask: np.ndarray, dx0: int, dy0: int, dx1: int, dy1: int) -> None:
        rows, cols = np.nonzero(mask)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((c + dx0, r + dy0), []).append((c + dx1, r + dy1))

    add(core & ~m[:-2, 1:-1], 0, 0, 1, 0)   # top: left -> right
    add(core & ~m[1:-1, 2:], 1, 0, 1, 1)    # right: top -> bottom
    add(core & ~m[2:, 1:-1], 1, 1, 0, 1)    # bottom: right -> left
    add(core & ~m[1:-1, :-2], 0, 1, 0, 0)   # left: bottom -> top
    loops = []
    while edges:
        start = min(edges, key=lambda v: (v[1], v[0]))
        loop = [start]
        prev, cur = None, start
        while True:
            outs = edges[cur]
            if len(outs) == 1 or prev is None:
                nxt = outs[0]
            else:  # a corner where the boundary touches itself: take the right turn (towards the interior)
                dx, dy = cur[0] - prev[0], cur[1] - prev[1]
                right = (cur[0] - dy, cur[1] + dx)
                nxt = right if right in outs else outs[0]
            outs.remove(nxt)
            if not outs:
                del edges[cur]
            prev, cur = cur, nxt
            if cur == start:
                break
            loop.append(cur)
        loops.append(_drop_collinear(np.asarray(loop, dtype=np.float64)))
    return loops


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    keep = []
    n = len(pts)
    for i in range(n):
        a, b, c = pts[i - 1], pts[i], pts[(i + 1) % n]
        if np.allclose(a, b):
            continue
        cross = (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])
        if abs(cross) > 1e-9:
            keep.append(b)
    return np.asarray(keep if len(keep) >= 3 else pts, dtype=np.float64)


def mask_polygon(rle: dict) -> np.ndarray:
    """One (N, 2) polygon (x, y pixel coordinates) covering the mask; empty array for an empty mask."""
    from scipy import ndimage

    mask = decode(rle).astype(bool)
    if not mask.any():
        return np.zeros((0, 2))
    rows, cols = np.nonzero(mask)
    y0, x0 = rows.min(), cols.min()
    crop = mask[y0 : rows.max() + 1, x0 : cols.max() + 1]
    labels, n = ndimage.label(crop)  # 4-connectivity
    parts = []
    for i in range(1, n + 1):
        comp = ndimage.binary_fill_holes(labels == i)
        parts += [loop + [x0, y0] for loop in _boundary_loops(comp)]
    parts.sort(key=lambda p: (p[:, 1].min(), p[:, 0].min()))
    return _bridge(parts)


def _bridge(parts: list[np.ndarray]) -> np.ndarray:
    """Join polygons into one: each part starts at its point nearest the previous part's start."""
    if len(parts) == 1:
        return parts[0]
    starts, rotated = [], []
    prev = parts[0][0]
    for p in parts:
        j = int(np.argmin(((p - prev) ** 2).sum(1)))
        r = np.concatenate([p[j:], p[:j], p[j : j + 1]])  # closed loop back to its start
        rotated.append(r)
        starts.append(r[0])
        prev = r[0]
    path = np.concatenate(rotated)
    back = np.asarray(starts[-2:0:-1]) if len(starts) > 2 else np.zeros((0, 2))
    return np.concatenate([path, back]) if len(back) else path


def box_polygon(bbox) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
