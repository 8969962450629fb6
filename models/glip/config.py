"""Configuration objects for the GLIP grounded detector.

Every size used to build :class:`~labelmill.models.glip.model.GLIP` lives in
:class:`GLIPConfig`.  Three presets are provided:

* :meth:`GLIPConfig.glip_t` -- GLIP-T as defined by the official
  ``configs/pretrain/glip_Swin_T_O365_GoldG.yaml`` (Swin-T, BERT-base,
  six VL-DyHead layers).  This is the architecture of the released
  ``glip_tiny_model_o365_goldg*.pth`` checkpoints.
* :meth:`GLIPConfig.glip_l` -- GLIP-L (``glip_Swin_L.yaml``): Swin-L with
  12x12 windows and eight VL-DyHead layers; otherwise the same code.
* :meth:`GLIPConfig.tiny` -- a miniature network with the same module
  structure (and therefore the same state-dict naming scheme) that runs on a
  CPU in well under a second.  Only useful with random weights, for tests.

Values that the official YAML leaves at the maskrcnn-benchmark defaults are
spelled out here explicitly (e.g. the 80-way ``cls_logits`` layer that exists
in the checkpoint although the grounding model never uses it, GroupNorm with
16 groups, ATSS inference thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer backbone sizes."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.0  # stochastic depth, training only (GLIP's recipe: 0.2 Swin-T, 0.4 Swin-L)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channel count of each stage's output (C2..C5)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class TextConfig:
    """BERT language backbone sizes (mirrors ``transformers.BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # GLIP averages the last ``feature_layers`` encoder outputs for the
    # (unused at inference) "embedded" feature; the fused path always uses the
    # last layer.  Kept for completeness; GLIP-T uses 1.
    feature_layers: int = 1


@dataclass(frozen=True)
class GLIPConfig:
    """All architecture, preprocessing and post-processing parameters."""

    name: str = "glip_t"
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)

    # Width of the FPN outputs and of every VL-DyHead feature map (GLIP uses
    # the same value for BACKBONE.OUT_CHANNELS, DYHEAD.CHANNELS and the
    # fusion's visual dimension).
    channels: int = 256
    dyhead_layers: int = 6
    group_norm_groups: int = 16
    group_norm_eps: float = 1e-5
    dyrelu_reduction: int = 4
    # The checkpoint carries an (unused) 80-way classification conv: the
    # maskrcnn-benchmark default of 81 classes minus background.
    legacy_num_classes: int = 80
    prior_prob: float = 0.01
    log_scale_init: float = 0.0

    # Image-text fusion (bidirectional multi-head attention, "MHA-B").
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    # Training-only regularisers (identity in eval; 0 here, GLIP's recipe values come from training/glip.py):
    # dropout of the fusion attention weights, of the head's BERT layers, DropBlock on the FPN's top-down path.
    fusion_dropout: float = 0.0
    head_text_dropout: float = 0.0
    fpn_drop_block_prob: float = 0.0
    fpn_drop_block_size: int = 3
    # Clamp used against fp16 overflow/underflow in the fusion attention,
    # the DyHead BERT layers and the token logits.
    clamp_value: float = 50000.0

    # Anchors (ATSS): one square anchor per location and level.
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (1.0,)
    scales_per_octave: int = 1
    octave: float = 2.0

    # Text.
    max_query_len: int = 256
    # transformers>=4.31 no longer saves ``embeddings.position_ids``; GLIP's
    # checkpoints (trained with an older transformers) do contain it.  When
    # True the buffer is made persistent again so the state dict matches the
    # official files key for key.
    persistent_position_ids: bool = True

    # Image preprocessing (BGR, 0-255, GLIP's normalisation).
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, float, float] = (57.375, 57.120, 58.395)
    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32

    # ATSS post-processing (maskrcnn-benchmark MODEL.ATSS defaults).
    pre_nms_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_image: int = 100

    @property
    def num_levels(self) -> int:
        return len(self.anchor_strides)

    @property
    def anchors_per_location(self) -> int:
        return len(self.aspect_ratios) * self.scales_per_octave

    def with_overrides(self, **kwargs) -> "GLIPConfig":
        """Return a copy with some fields replaced (e.g. smaller ``min_size``)."""
        return replace(self, **kwargs)

    # ------------------------------------------------------------------ presets
    @classmethod
    def glip_t(cls) -> "GLIPConfig":
        """GLIP-T (Swin-T backbone, 6 VL-DyHead layers)."""
        return cls(name="glip_t")

    @classmethod
    def glip_l(cls) -> "GLIPConfig":
        """GLIP-L (Swin-L backbone with 12x12 windows, 8 VL-DyHead layers)."""
        return cls(
            name="glip_l",
            swin=SwinConfig(
                embed_dim=192,
                depths=(2, 2, 18, 2),
                num_heads=(6, 12, 24, 48),
                window_size=12,
            ),
            dyhead_layers=8,
        )

    @classmethod
    def tiny(cls) -> "GLIPConfig":
        """A miniature config with GLIP's module layout, for fast CPU tests."""
        return cls(
            name="tiny",
            swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7),
            text=TextConfig(
                vocab_size=512,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            channels=32,
            dyhead_layers=2,
            fusion_embed_dim=64,
            fusion_heads=4,
            max_query_len=32,
            min_size=128,
            max_size=224,
        )
