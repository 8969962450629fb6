"""The GLIP network: Swin+FPN image encoder, BERT text encoder, VL-DyHead, anchors.

Top-level attribute names reproduce the official checkpoint prefixes:
``backbone.body`` (Swin), ``backbone.fpn``, ``language_backbone.body.model``
(BERT), ``rpn.head`` (VL-DyHead) and ``rpn.anchor_generator``.

The forward pass is split so callers can reuse work: the image encoder does
not look at the text, so one image can be encoded once and paired with
several prompts (e.g. chunks of a large vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .anchors import AnchorGenerator
from .config import GLIPConfig
from .dyhead import VLDyHead
from .fpn import FPN
from .language import LanguageBackbone
from .swin import SwinTransformer


class VisionBackbone(nn.Module):
    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.body = SwinTransformer(cfg.swin)
        self.fpn = FPN(self.body.out_channels, cfg.channels, cfg.fpn_drop_block_prob, cfg.fpn_drop_block_size)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.body(images))


class DenseHead(nn.Module):
    """Container matching the checkpoint's ``rpn`` prefix."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.head = VLDyHead(cfg)
        self.anchor_generator = AnchorGenerator(
            cfg.anchor_sizes, cfg.anchor_strides, cfg.aspect_ratios, cfg.scales_per_octave, cfg.octave
        )


@dataclass
class GLIPOutput:
    """Raw per-level predictions for a batch.

    ``box_deltas[l]``: (B, 4, H, W); ``centerness[l]``: (B, 1, H, W) logits;
    ``token_logits[l]``: (B, H*W, L) alignment logits per text token;
    ``anchors[l]``: (H*W, 4) xyxy anchors in padded-image pixels (shared by
    the batch, since all images of a batch have one padded size).
    """

    box_deltas: list[torch.Tensor]
    centerness: list[torch.Tensor]
    token_logits: list[torch.Tensor]
    anchors: list[torch.Tensor]

    def select(self, index: int) -> "GLIPOutput":
        """The predictions of one batch element (batch dimension kept, size 1)."""
        sl = slice(index, index + 1)
        return GLIPOutput(
            [t[sl] for t in self.box_deltas],
            [t[sl] for t in self.centerness],
            [t[sl] for t in self.token_logits],
            self.anchors,
        )


class GLIP(nn.Module):
    """GLIP grounded detector (inference only)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = VisionBackbone(cfg)
        self.language_backbone = LanguageBackbone(cfg.text, cfg.persistent_position_ids)
        self.rpn = DenseHead(cfg)

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised, padded images (B, 3, H, W) -> pyramid [P3..P7]."""
        return self.backbone(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.language_backbone(input_ids, attention_mask)

    def predict_from_features(
        self, features: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> GLIPOutput:
        """Run text encoder and fusion head on precomputed image features.

        ``features[l][b]`` must be the features of the image paired with text row ``b``.
        """
        text = self.encode_text(input_ids, attention_mask)
        deltas, centerness, logits = self.rpn.head(features, text, attention_mask)
        anchors = self.rpn.anchor_generator([f.shape[-2:] for f in features])
        return GLIPOutput(deltas, centerness, logits, anchors)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> GLIPOutput:
        return self.predict_from_features(self.encode_images(images), input_ids, attention_mask)
