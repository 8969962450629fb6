"""Feature pyramid on top of the Swin stages: P3-P5 plus P6/P7 (``backbone.fpn``).

GLIP's "SWINT-FPN-RETINANET" body feeds C3, C4 and C5 (strides 8/16/32) into
lateral 1x1 convs ``fpn_inner2..4`` and 3x3 output convs ``fpn_layer2..4``
(the numbering starts at 2 because the unused stride-4 input is slot 1).
P6 is a stride-2 3x3 conv on P5 (not C5, since both have ``channels``
channels) and P7 a stride-2 conv on ReLU(P6); these live in ``top_blocks``.
No normalisation or activation inside the FPN convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .regularise import DropBlock2D


class LastLevelP6P7(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down pyramid; returns [P3, P4, P5, P6, P7]."""

    def __init__(self, in_channels: tuple[int, ...], channels: int, drop_block: float = 0.0, drop_block_size: int = 3):
        super().__init__()
        # GLIP's FPN.DROP_BLOCK: on each merged top-down map before its 3x3 conv, training only
        self.drop_block = DropBlock2D(drop_block, drop_block_size)
        # Slot numbering as in the checkpoint: inputs are slots 2, 3, 4.
        self._slots = list(range(2, 2 + len(in_channels)))
        for slot, c_in in zip(self._slots, in_channels):
            inner = nn.Conv2d(c_in, channels, 1)
            layer = nn.Conv2d(channels, channels, 3, padding=1)
            for conv in (inner, layer):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
            self.add_module(f"fpn_inner{slot}", inner)
            self.add_module(f"fpn_layer{slot}", layer)
        self.top_blocks = LastLevelP6P7(channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        slots = self._slots
        top = getattr(self, f"fpn_inner{slots[-1]}")(feats[-1])
        outs = [getattr(self, f"fpn_layer{slots[-1]}")(top)]
        for slot, feat in zip(reversed(slots[:-1]), reversed(feats[:-1])):
            lateral = getattr(self, f"fpn_inner{slot}")(feat)
            if lateral.shape[-2:] != top.shape[-2:]:
                top = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            top = lateral + top
            outs.insert(0, getattr(self, f"fpn_layer{slot}")(self.drop_block(top)))
        return outs + self.top_blocks(outs[-1])
