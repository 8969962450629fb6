"""Training-time regularisers of GLIP's student recipe; all are the identity in eval mode (and at rate 0).

* :class:`DropPath`: stochastic depth on a residual branch (Swin's ``DROP_PATH_RATE``: 0.2 for GLIP-T,
  0.4 for GLIP-L, growing linearly from 0 over the blocks);
* :class:`DropBlock2D`: contiguous ``size`` x ``size`` regions of a feature map dropped (GLIP's FPN:
  ``DROP_PROB`` 0.3, ``DROP_SIZE`` 3), the rest rescaled to keep the mean.

Dropout in the fusion attention and the head's BERT layers is ``F.dropout`` where those modules use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DropBlock2D(nn.Module):
    def __init__(self, prob: float = 0.0, size: int = 3):
        super().__init__()
        self.prob, self.size = float(prob), int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob <= 0.0:
            return x
        gamma = self.prob / (self.size**2)
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        dropped = F.max_pool2d(seeds, self.size, stride=1, padding=self.size // 2)
        if self.size % 2 == 0:
            dropped = dropped[..., :-1, :-1]
        keep = 1.0 - dropped
        return x * keep * keep.numel() / keep.sum().clamp_min(1.0)
