"""RLE mask -> one polygon (Ultralytics segmentation format), for the rasteriser that will fill it.

``mask_polygon(rle, at="centres")`` (what ``export-yolo --task segment``
writes) runs through the centres of the mask's boundary pixels: OpenCV's
``fillPoly``, which Ultralytics and supervision use to turn polygons back
into masks, fills the pixels inside the polygon *and* those its edges cross,
so this outline gives the mask back exactly (holes filled), with pixel
centres at integer coordinates as OpenCV has them.  ``at="edges"`` is the
outline along pixel edges described below, exact under a point-in-polygon
test at pixel centres (pycocotools' ``frPyObjects``, skimage's
``polygon2mask``) but one pixel too wide under OpenCV.

Each 4-connected component's outer boundary is traced along pixel edges (a
mask pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), so the polygon's
vertices are exact pixel corners and a point-in-polygon test at pixel
centres gives the mask back exactly, except that holes, which the
Ultralytics format cannot hold, are filled (each part's own holes; a gap
that several parts enclose together stays open).  Several components
become one polygon joined by zero-width bridges walked out and back (the
approach YOLO converters use for multi-part COCO masks), each chosen to pass
between pixel centres, so the polygon's filled area is the union of the
parts (a rasteriser that also fills boundary pixels, like OpenCV's, adds the
one-pixel-wide bridge lines).  Collinear points are dropped; no vertex moves.
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
    """Keep the corners of a closed lattice path (every vertex where the direction turns)."""
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    turns = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] != 0
    return pts[turns] if turns.sum() >= 3 else pts


def _to_centres(loop: np.ndarray) -> np.ndarray:
    """A clockwise (y down) loop along pixel edges -> the loop through its boundary pixels' centres.

    Every edge moves half a pixel inwards (a vertex moves by half the sum of
    its two edges' inward normals), then everything half a pixel up-left, so
    pixel ``(r, c)``'s centre is ``(c, r)``.
    """
    d_in = loop - np.roll(loop, 1, axis=0)
    d_out = np.roll(loop, -1, axis=0) - loop
    d_in = np.sign(d_in)
    d_out = np.sign(d_out)
    n_in = np.stack([-d_in[:, 1], d_in[:, 0]], 1)
    n_out = np.stack([-d_out[:, 1], d_out[:, 0]], 1)
    return loop + 0.5 * (n_in + n_out) - 0.5


def mask_polygon(rle: dict, at: str = "edges") -> np.ndarray:
    """One (N, 2) polygon (x, y pixel coordinates) covering the mask; empty array for an empty mask.

    ``at``: ``edges`` (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``) or ``centres`` (for OpenCV's fill;
    pixel ``(r, c)``'s centre is ``(c, r)``), see the module doc."""
    if at not in ("edges", "centres"):
        raise ValueError(f"at must be 'edges' or 'centres', not {at!r}")
    from scipy import ndimage

    mask = decode(rle).astype(bool)
    if not mask.any():
        return np.zeros((0, 2))
    rows, cols = np.nonzero(mask)
    y0, x0 = rows.min(), cols.min()
    crop = mask[y0 : rows.max() + 1, x0 : cols.max() + 1]
    labels, n = ndimage.label(crop)  # 4-connectivity
    filled = [ndimage.binary_fill_holes(labels == i) for i in range(1, n + 1)]
    order = sorted(range(n), key=lambda i: -int(filled[i].sum()))
    covered = np.zeros_like(crop)
    parts = []
    for i in order:
        comp = filled[i]
        if not (comp & ~covered).any():  # inside another part's hole: that part's outline covers it already
            continue                     # (a second outline there would cut it out again under even-odd fill)
        covered |= comp
        loops = [loop + [x0, y0] for loop in _boundary_loops(comp)]
        parts += [_dedupe(_to_centres(loop)) for loop in loops] if at == "centres" else loops
    parts.sort(key=lambda p: (p[:, 1].min(), p[:, 0].min()))
    return _bridge(parts, between_centres=at == "edges")


def _dedupe(pts: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats (a one-pixel-wide part's outline collapses onto itself)."""
    keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)
    return pts[keep] if keep.any() else pts[:1]


def _misses_pixel_centres(d: np.ndarray) -> np.ndarray:
    """Whether a segment between lattice points with offsets ``d`` (N, 2) avoids every pixel centre.

    ``(x0, y0) + t (dx, dy)`` hits a centre ``(a + 1/2, b + 1/2)`` only when
    ``(2(a - x0) + 1) dy == (2(b - y0) + 1) dx``, which needs dx and dy to
    hold the same power of two; a segment whose dx and dy differ there (an
    axis-parallel one included) passes between centres, so rasterising the
    polygon at pixel centres never sees the bridge.
    """
    dx, dy = np.abs(d[:, 0]).astype(np.int64), np.abs(d[:, 1]).astype(np.int64)
    return (dx == 0) | (dy == 0) | ((dx & -dx) != (dy & -dy))


def _bridge(parts: list[np.ndarray], between_centres: bool = True) -> np.ndarray:
    """Join polygons into one: each part starts at the vertex nearest the previous part's start
    (``between_centres``: among those whose bridge passes between pixel centres); the walk returns along
    the same bridges."""
    if len(parts) == 1:
        return parts[0]
    starts, rotated = [], []
    prev = parts[0][0]
    for p in parts:
        dist = ((p - prev) ** 2).sum(1)
        if between_centres:
            dist = dist + np.where(_misses_pixel_centres(p - prev), 0, 1e12)
        j = int(np.argmin(dist))
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
