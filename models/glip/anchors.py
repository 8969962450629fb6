"""ATSS anchors and box coding (``rpn.anchor_generator`` in the checkpoint).

Conventions are those of maskrcnn-benchmark, which GLIP inherits: boxes are
``(x1, y1, x2, y2)`` with *inclusive* pixel extents, so a box's width is
``x2 - x1 + 1``.  The per-level "cell" anchors are stored as persistent
buffers ``cell_anchors.<level>`` because the official checkpoints contain them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Regression weights (dx, dy, dw, dh) of GLIP's ATSS box coder.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Upper bound on dw/dh before exponentiation.
BOX_DELTA_CLAMP = math.log(1000.0 / 16)


def cell_anchors(stride: int, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Anchors centred on the first cell of a level, shape (len(ratios)*len(sizes), 4).

    The reference window is ``[0, 0, stride-1, stride-1]``; for each aspect
    ratio its area is kept (widths rounded to whole pixels), then each size
    scales it by ``size / stride``.
    """
    center = (stride - 1) / 2.0
    rows = []
    for ratio in aspect_ratios:
        base_w = round(math.sqrt(stride * stride / ratio))
        base_h = round(base_w * ratio)
        for size in sizes:
            w = base_w * size / stride
            h = base_h * size / stride
            rows.append([center - 0.5 * (w - 1), center - 0.5 * (h - 1), center + 0.5 * (w - 1), center + 0.5 * (h - 1)])
    return torch.tensor(rows, dtype=torch.float32)


class _CellAnchors(nn.Module):
    """Holds one buffer per level, named "0", "1", ... like the checkpoint."""

    def __init__(self, anchors: list[torch.Tensor]):
        super().__init__()
        for i, a in enumerate(anchors):
            self.register_buffer(str(i), a)

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, str(i))

    def __len__(self) -> int:
        return len(self._buffers)


class AnchorGenerator(nn.Module):
    def __init__(
        self,
        sizes: tuple[float, ...],
        strides: tuple[int, ...],
        aspect_ratios: tuple[float, ...],
        scales_per_octave: int = 1,
        octave: float = 2.0,
    ):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError("one anchor size per pyramid level is required")
        self.strides = tuple(strides)
        per_level = []
        for size, stride in zip(sizes, strides):
            level_sizes = tuple(size * octave ** (k / scales_per_octave) for k in range(scales_per_octave))
            per_level.append(cell_anchors(stride, level_sizes, aspect_ratios))
        self.cell_anchors = _CellAnchors(per_level)

    def forward(self, grid_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Anchors for each level as (H*W*A, 4), ordered row-major then by anchor."""
        out = []
        for level, ((h, w), stride) in enumerate(zip(grid_sizes, self.strides)):
            base = self.cell_anchors[level]
            ys = torch.arange(h, device=base.device, dtype=torch.float32) * stride
            xs = torch.arange(w, device=base.device, dtype=torch.float32) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + base.view(1, -1, 4)).reshape(-1, 4))
        return out


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Apply regression deltas (N, 4) to anchors (N, 4); returns xyxy boxes."""
    anchors = anchors.to(deltas.dtype)
    wx, wy, ww, wh = BOX_CODER_WEIGHTS
    widths = anchors[:, 2] - anchors[:, 0] + 1
    heights = anchors[:, 3] - anchors[:, 1] + 1
    ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
    ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=BOX_DELTA_CLAMP)
    dh = torch.clamp(deltas[:, 3] / wh, max=BOX_DELTA_CLAMP)
    cx = dx * widths + ctr_x
    cy = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths - 1)
    half_h = 0.5 * (torch.exp(dh) * heights - 1)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
