"""Label maps from coarse score maps: two bilinear resizes folded into one, and an exact pruned argmax.

MaskCLIP's head gives (C, h, w) class scores on its patch grid.  The
reference resizes them bilinearly twice (grid -> resized image -> original
photo, ``align_corners=False``) and takes the argmax over classes at every
pixel of the photo: C x H x W values, most of them for classes that cannot
win there.

Both resizes are linear and act on rows and columns separately, so output
row ``y`` is a fixed convex combination of a few consecutive grid rows
(:class:`Taps`: at most three when the first resize enlarges), and the same
for columns.  :func:`resample` evaluates that combination with elementwise
operations in a fixed order, so a pixel's value does not depend on which
other pixels or classes are computed with it: a pruned computation gives
bit-for-bit the values of the full one.

:func:`pruned_argmax` splits the output into bands of rows and blocks of
columns.  Every value of a class inside a tile is a convex combination of
that class's grid values in the tile's window, so it lies between their
minimum and maximum.  The winner's value in a tile is at least
``L = max over classes of their window minimum``; a class whose window
maximum is below ``L`` cannot win in that tile and is not computed there.
With peaked score maps most bands have one or two candidates instead of
every class, and the argmax equals the full one (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch



def _interp_matrix(out_len: int, in_len: int) -> torch.Tensor:
    """(out_len, in_len) weights of a bilinear resize, ``align_corners=False``, as mmseg and PyTorch do."""
    if out_len == in_len:
        return torch.eye(in_len, dtype=torch.float64)
    pos = ((torch.arange(out_len, dtype=torch.float64) + 0.5) * (in_len / out_len) - 0.5).clamp_min(0)
    lo = pos.floor().long().clamp(max=in_len - 1)
    hi = (lo + 1).clamp(max=in_len - 1)
    frac = (pos - lo).clamp(0, 1)
    mat = torch.zeros(out_len, in_len, dtype=torch.float64)
    rows = torch.arange(out_len)
    mat.index_put_((rows, lo), 1 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat


@dataclass(frozen=True)
class Taps:
    """One axis of the composed resize: output ``i`` = sum_t ``weight[i, t]`` x grid[``start[i] + t``]."""

    start: torch.Tensor  # (n,) long, first grid index of each output's support
    weight: torch.Tensor  # (n, T) float32; taps past the grid's end have weight 0
    end: torch.Tensor  # (n,) long, last grid index with a non-zero weight
    grid_len: int
    #: (first, stop, start): runs of consecutive outputs whose support starts at the same grid index
    runs: tuple[tuple[int, int, int], ...]

    def index(self, t: int) -> torch.Tensor:
        return (self.start + t).clamp(max=self.grid_len - 1)


@lru_cache(maxsize=256)
def _taps_cpu(grid_len: int, mid_len: int, out_len: int) -> Taps:
    composed = _interp_matrix(out_len, mid_len) @ _interp_matrix(mid_len, grid_len)  # (out, grid)
    nonzero = composed > 0
    start = nonzero.float().argmax(dim=1)
    end = grid_len - 1 - nonzero.flip(1).float().argmax(dim=1)
    width = int((end - start).max()) + 1
    idx = (start[:, None] + torch.arange(width)[None]).clamp(max=grid_len - 1)
    weight = composed.gather(1, idx)
    weight[(start[:, None] + torch.arange(width)[None]) > end[:, None]] = 0
    return Taps(start, weight.float(), end, grid_len, _runs(start.tolist()))


def _runs(starts: list[int]) -> tuple[tuple[int, int, int], ...]:
    runs, first = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] != starts[first]:
            runs.append((first, i, starts[first]))
            first = i
    return tuple(runs)


_device_taps: dict = {}


def taps(grid_len: int, mid_len: int, out_len: int, device: torch.device) -> Taps:
    """The composed weights of resizing ``grid_len`` -> ``mid_len`` -> ``out_len`` (cached per device)."""
    cpu = _taps_cpu(grid_len, mid_len, out_len)
    if torch.device(device).type == "cpu":
        return cpu
    key = (grid_len, mid_len, out_len, str(device))
    if key not in _device_taps:
        if len(_device_taps) > 256:
            _device_taps.clear()
        _device_taps[key] = Taps(cpu.start.to(device), cpu.weight.to(device), cpu.end.to(device), grid_len,
                                   cpu.runs)
    return _device_taps[key]


def resample_cols(grid: torch.Tensor, tx: Taps) -> torch.Tensor:
    """(C, r, gw) -> (C, r, W): the column half of :func:`resample`."""
    out = tx.weight[:, 0] * grid.index_select(-1, tx.index(0))
    for t in range(1, tx.weight.shape[1]):
        out = out + tx.weight[:, t] * grid.index_select(-1, tx.index(t))
    return out


#: above this many runs in the requested rows, :func:`resample_rows` gathers rows instead of looping
MAX_RUNS = 48


def resample_rows(cols: torch.Tensor, ty: Taps, y0: int = 0, y1: int | None = None, offset: int = 0) -> torch.Tensor:
    """(C, r, W) column-resampled grid rows -> (C, y1 - y0, W): output rows ``y0`` to ``y1``.

    ``cols`` holds grid rows ``offset`` to ``offset + r``.  Every output
    element is ``w0 * v0 + w1 * v1 + ...`` in that order, whether its grid
    rows are broadcast (few runs: one per run of rows sharing a support) or
    gathered; a tap past a row's support has weight 0, whatever row it reads.
    """
    y1 = len(ty.start) if y1 is None else y1
    last = cols.shape[1] - 1
    T = ty.weight.shape[1]
    runs = [(max(a, y0), min(b, y1), s) for a, b, s in ty.runs if a < y1 and b > y0]
    if len(runs) > MAX_RUNS:
        w = ty.weight[y0:y1]
        out = w[:, 0, None] * cols.index_select(1, ty.index(0)[y0:y1] - offset)
        for t in range(1, T):
            out = out + w[:, t, None] * cols.index_select(1, (ty.index(t)[y0:y1] - offset).clamp(max=last))
        return out
    out = cols.new_empty(cols.shape[0], y1 - y0, cols.shape[2])
    for a, b, s in runs:
        w = ty.weight[a:b]
        acc = w[None, :, 0, None] * cols[:, None, s - offset]
        for t in range(1, T):
            acc = acc + w[None, :, t, None] * cols[:, None, min(s + t, ty.grid_len - 1) - offset if
                                                         min(s + t, ty.grid_len - 1) - offset <= last else last]
        out[:, a - y0 : b - y0] = acc
    return out


def resample(grid: torch.Tensor, mid_hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) grid values resized bilinearly to ``mid_hw`` and then to ``size``, as (C, *size) float32."""
    grid = grid.float()
    ty = taps(grid.shape[1], mid_hw[0], size[0], grid.device)
    tx = taps(grid.shape[2], mid_hw[1], size[1], grid.device)
    return resample_rows(resample_cols(grid, tx), ty)


@lru_cache(maxsize=256)
def _segments(grid_len: int, mid_len: int, out_len: int, tile: int) -> tuple[tuple[int, int, int, int], ...]:
    """Runs of at most ``tile`` outputs whose weight vectors lie on the segment between the run's first
    and last output, in order: (first, stop, window start, window stop).

    Along such a run every resampled value is a convex combination of the
    values at its two ends (the weights are linear in the position along
    the segment).  A run of outputs sharing one two-cell support always
    qualifies; the longest run from each start is found by bisection.
    """
    m = (_interp_matrix(out_len, mid_len) @ _interp_matrix(mid_len, grid_len)).numpy()
    t = _taps_cpu(grid_len, mid_len, out_len)
    start, end = t.start.tolist(), t.end.tolist()

    def on_segment(i: int, j: int) -> bool:  # outputs i..j (inclusive)
        if j - i < 2:
            return True
        d = m[j] - m[i]
        norm = float(d @ d)
        rest = m[i + 1 : j] - m[i]
        if norm == 0:
            return bool(np.abs(rest).max() < 1e-12)
        s = rest @ d / norm
        off = np.abs(rest - s[:, None] * d[None]).max()
        return bool(off < 1e-9 and s.min() >= -1e-9 and s.max() <= 1 + 1e-9 and np.all(np.diff(s) >= -1e-9))

    runs, i = [], 0
    while i < out_len:
        good, bad = 1, min(tile, out_len - i) + 1  # the longest run from i on one segment (the property
        while bad - good > 1:                        # holds for every shorter run too: bisect)
            n = (good + bad) // 2
            good, bad = (n, bad) if on_segment(i, i + n - 1) else (good, n)
        runs.append((i, i + good, min(start[i : i + good]), max(end[i : i + good]) + 1))
        i += good
    return tuple(runs)


def corner_values(grid: torch.Tensor, ty: Taps, tx: Taps, rows, cols) -> torch.Tensor:
    """(C, nr, 2, nc, 2) resampled values at the first and last output of every row run and column run."""
    ys = torch.tensor([y for y0, y1, _, _ in rows for y in (y0, y1 - 1)], device=grid.device)
    xs = torch.tensor([x for x0, x1, _, _ in cols for x in (x0, x1 - 1)], device=grid.device)
    sub_x = Taps(tx.start[xs], tx.weight[xs], tx.end[xs], tx.grid_len, ())
    sub_y = Taps(ty.start[ys], ty.weight[ys], ty.end[ys], ty.grid_len, _runs(ty.start[ys].tolist()))
    v = resample_rows(resample_cols(grid, sub_x), sub_y)  # (C, 2 nr, 2 nc)
    return v.view(len(grid), len(rows), 2, len(cols), 2)


def tile_candidates(v: torch.Tensor) -> torch.Tensor:
    """(C, nr, nc): may class c win at some pixel of tile (r, c)?  Exact, from the tile's corner values
    ``v`` (C, nr, nc, 4).

    Inside a tile a class's value, and the difference of two classes, is
    bilinear in the position, so its extremes are at the corners.  First a
    cheap test: a class whose best corner is below the best worst-corner of
    any class cannot win.  Then, for the classes that pass somewhere: a class
    that some corner's winner beats at all four corners (by more than
    rounding) cannot win in the tile either.
    """
    C, nr, nc, _ = v.shape
    margin = 1e-5 * (1 + v.abs().amax())  # far above the rounding of the resample
    floor = v.amin(dim=-1).amax(dim=0)
    passed = v.amax(dim=-1) >= floor - margin  # (C, nr, nc)
    some = passed.flatten(1).any(dim=1).nonzero().flatten()
    if len(some) <= 1:
        return passed
    v = v[some]
    winners = v.argmax(dim=0)  # (nr, nc, 4): each corner's winner (among ``some``: it passes)
    iy = torch.arange(nr, device=v.device)[:, None, None, None]
    ix = torch.arange(nc, device=v.device)[None, :, None, None]
    j = torch.arange(4, device=v.device)[None, None, None, :]
    rival = v[winners[..., :, None], iy, ix, j]  # (nr, nc, 4 winners, 4 corners)
    beaten = ((rival[None] - v[:, :, :, None, :]).amin(dim=-1) > margin).any(dim=-1)
    passed[some] &= ~beaten
    return passed


#: the value given to padding candidates: far below any score, and finite, so a zero weight gives 0
PAD_VALUE = -1e30


def _stack_chosen(chosen: torch.Tensor, fill: int) -> tuple[torch.Tensor, list[int]]:
    """For a (C, bands, blocks) choice: (depth, bands, blocks) the chosen classes of every tile in class
    order, then ``fill``; and the count of each band's busiest tile."""
    count = chosen.sum(dim=0)
    k_max = count.amax(dim=1).tolist()
    depth = max(max(k_max), 1)
    rank = torch.where(chosen, chosen.cumsum(dim=0) - 1, depth)  # unchosen go to a dropped last slot
    out = torch.full((depth + 1, *chosen.shape[1:]), fill, dtype=torch.long, device=chosen.device)
    classes = torch.arange(chosen.shape[0], device=chosen.device)[:, None, None].expand_as(chosen)
    out.scatter_(0, rank, classes)
    return out[:depth], k_max


def _columns(source: torch.Tensor, channels: torch.Tensor, a: int, z: int, tx: Taps, xs) -> torch.Tensor:
    """The column pass of :func:`resample_cols` for grid rows ``a:z`` of ``source``, each column on its
    own ``channels`` (k, W): the same operations in the same order."""
    grid_rows = torch.arange(a, z, device=source.device)[None, :, None]
    sel = channels[:, None, :]
    out = tx.weight[:, 0] * source[sel, grid_rows, xs[0]]
    for t in range(1, len(xs)):
        out = out + tx.weight[:, t] * source[sel, grid_rows, xs[t]]
    return out


#: tile sides in output pixels: tall bands keep the per-band loop short, narrow blocks keep candidates few
TILE_ROWS, TILE_COLS = 64, 16


def pruned_labels(grid: torch.Tensor, mid_hw: tuple[int, int], size: tuple[int, int], clamp_sum: bool = False):
    """(best value, class index, normaliser) per pixel of ``v = resample(grid, mid_hw, size)``.

    ``best, index`` equal ``v.max(dim=0)`` (values bit-for-bit; among exact
    ties the lowest class, as ``max`` picks), computing only classes that may
    win: the output is cut into tiles (:func:`_segments`), and the classes
    that may win in a tile follow from its corners (:func:`tile_candidates`).
    In a band of rows every column computes as many candidates as the band's
    busiest tile has: its own tile's, then padding that cannot win.

    With ``clamp_sum`` the normaliser is ``v.clamp_min(0).sum(dim=0)`` (equal
    up to rounding): in a tile, the classes >= 0 at all four corners are >= 0
    on the whole tile and are summed on the grid first, classes <= 0 at all
    corners add nothing, and only the ones that change sign are resampled.
    Otherwise it is None.  Moves a few counts to the host, so it suits the
    CPU; on an accelerator, computing every class costs no host sync.
    """
    grid = grid.float()
    C, gh, gw = grid.shape
    dev = grid.device
    ty = taps(gh, mid_hw[0], size[0], dev)
    tx = taps(gw, mid_hw[1], size[1], dev)
    rows, cols = _segments(gh, mid_hw[0], size[0], TILE_ROWS), _segments(gw, mid_hw[1], size[1], TILE_COLS)
    corners = corner_values(grid, ty, tx, rows, cols).permute(0, 1, 3, 2, 4).reshape(C, len(rows), len(cols), 4)
    block_of_x = torch.cat([torch.full((x1 - x0,), j, dtype=torch.long) for j, (x0, x1, _, _) in enumerate(cols)])
    block_of_x = block_of_x.to(dev)
    xs = [tx.index(t) for t in range(tx.weight.shape[1])]
    padded = torch.cat([grid, grid.new_full((1, gh, gw), PAD_VALUE)])
    winners, k_win = _stack_chosen(tile_candidates(corners), C)
    heights = [y1 - y0 for y0, y1, _, _ in rows]
    if clamp_sum:
        low, high = corners.amin(dim=-1), corners.amax(dim=-1)  # (C, bands, blocks)
        positive = (low >= 0).to(grid.dtype)
        signed, k_sign = _stack_chosen((low < 0) & (high > 0), C)
        norm = torch.empty(size, dtype=torch.float32, device=dev)
    work = sum(k * h for k, h in zip(k_win, heights))
    if clamp_sum:
        work += sum((k + 1) * h for k, h in zip(k_sign, heights))
    if work > PRUNE_LIMIT * C * size[0] * (2 if clamp_sum else 1):
        # flat maps (random weights, a tiny model): nearly every class may win everywhere, and the
        # per-tile gathers would cost more than resampling every class
        return full_labels(grid, mid_hw, size, clamp_sum)
    best = torch.empty(size, dtype=torch.float32, device=dev)
    arg = torch.empty(size, dtype=torch.long, device=dev)
    for b, (y0, y1, a, z) in enumerate(rows):
        classes = winners[: k_win[b], b][:, block_of_x]  # (k, W)
        vals = resample_rows(_columns(padded, classes, a, z, tx, xs), ty, y0, y1, a)  # (k, rows, W)
        if len(classes) == 1:
            best[y0:y1], arg[y0:y1] = vals[0], classes[0]
        else:
            v, i = vals.max(dim=0)
            best[y0:y1], arg[y0:y1] = v, classes.gather(0, i)
        if clamp_sum:
            # each tile's classes >= 0 summed on the band's grid rows: one channel per column block
            sums = torch.einsum("cj,crw->jrw", positive[:, b], grid[:, a:z])
            source = torch.cat([padded[:, a:z], sums])
            channels = torch.cat([C + 1 + block_of_x[None], signed[: k_sign[b], b][:, block_of_x]])
            part = resample_rows(_columns(source, channels, 0, z - a, tx, xs), ty, y0, y1, a)
            norm[y0:y1] = part.clamp_min(0).sum(dim=0)
    return best, arg, (norm if clamp_sum else None)


#: prune only while the classes computed per pixel stay below this share of all classes
PRUNE_LIMIT = 0.4
#: floats per chunk of classes resampled at once by :func:`full_labels`
CHUNK_ELEMENTS = 1 << 24


def full_labels(grid: torch.Tensor, mid_hw: tuple[int, int], size: tuple[int, int], clamp_sum: bool = False):
    """What :func:`pruned_labels` returns, computed by resampling every class (in chunks of classes)."""
    step = max(1, CHUNK_ELEMENTS // max(1, size[0] * size[1]))
    best = arg = norm = None
    for start in range(0, len(grid), step):
        chunk = resample(grid[start : start + step], mid_hw, size)
        if clamp_sum:
            part = chunk.clamp_min(0).sum(dim=0)
            norm = part if norm is None else norm + part
        val, idx = chunk.max(dim=0)
        if best is None:
            best, arg = val, idx
        else:
            better = val > best  # ties keep the earlier (lower) class, as max over all classes does
            best, arg = torch.where(better, val, best), torch.where(better, idx + start, arg)
    return best, arg, norm


def pruned_argmax(grid: torch.Tensor, mid_hw: tuple[int, int], size: tuple[int, int]):
    """(best value, class index) per pixel of ``resample(grid, mid_hw, size)``: see :func:`pruned_labels`."""
    best, arg, _ = pruned_labels(grid, mid_hw, size)
    return best, arg
