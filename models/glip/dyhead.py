"""Vision-language DyHead with early fusion and the ATSS prediction layers (``rpn.head``).

One DyHead layer is three entries of ``dyhead_tower`` (checkpoint layout):

``3i``     :class:`VLFuse`        bidirectional image<->text cross-attention
                                   over all pyramid levels at once (MHA-B)
``3i + 1`` :class:`BertFusionLayer` one BERT encoder layer on the fused text
``3i + 2`` :class:`DyConv`        scale-aware modulated deformable convs,
                                   level attention and DyReLU on each level

After the tower, :class:`VLDyHead` predicts per level: box deltas (scaled per
level), centerness, and token-alignment logits as the dot product between
the fused visual features and projected, L2-normalised fused token features.

Faithfulness notes (all deliberate, to reproduce checkpoint behaviour):

* The deformable offsets/masks of a level come from that level's features
  and are also handed to the convolution applied to the *coarser* neighbour,
  whose output grid is smaller.  The official CUDA kernel then reads the
  leading elements of each sample's offset/mask memory as if they had the
  smaller shape; :func:`_fit_offsets` reproduces that reinterpretation.
* The coarser neighbour is upsampled with bilinear ``align_corners=True``
  (``F.upsample_bilinear``).
* Level attention and DyReLU use global average pooling, and GroupNorm uses
  whole-map statistics: padding pixels influence every output.
* Clamps to +-50000 (fp16 guards) are applied where the reference applies them.
* Deformable convolutions always run in float32, also under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from .config import GLIPConfig, TextConfig


def _clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    return x.clamp(min=-limit, max=limit)


#: where the fusion attention uses ``F.scaled_dot_product_attention`` outside training: "cuda" (default:
#: fused kernels, no (B, H, Nv, Nl) logits materialised twice), "always" or "never". The eager path (the
#: reference's arithmetic, including its clamp of the logits at +-clamp_value) serves training and the CPU,
#: where labels stay bit for bit those of earlier versions. The two agree up to float rounding while
#: |logits| < clamp_value (50,000), i.e. unless the forward overflowed (tests/test_glip_model.py).
FUSED_ATTENTION = "cuda"


def _fused(module: nn.Module, x: torch.Tensor) -> bool:
    if module.training or FUSED_ATTENTION == "never":
        return False
    return FUSED_ATTENTION == "always" or x.is_cuda


class HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def _fit_offsets(offset: torch.Tensor, mask: torch.Tensor, out_h: int, out_w: int):
    """Give offset/mask the output grid (out_h, out_w) the way the CUDA kernel reads them.

    When the grid already matches, the tensors are returned unchanged.  When
    the output grid is smaller, each sample's offsets are read as a flat,
    channel-major buffer whose first ``18*out_h*out_w`` values are viewed as
    ``(18, out_h, out_w)`` (likewise for the 9 mask channels).
    """
    n, c_off, h, w = offset.shape
    if (h, w) == (out_h, out_w):
        return offset, mask
    if out_h * out_w > h * w:
        raise ValueError("deformable offsets are smaller than the convolution output")
    size = out_h * out_w
    c_mask = mask.shape[1]
    offset = offset.reshape(n, -1)[:, : c_off * size].reshape(n, c_off, out_h, out_w)
    mask = mask.reshape(n, -1)[:, : c_mask * size].reshape(n, c_mask, out_h, out_w)
    return offset, mask


class ModulatedDeformConv(nn.Module):
    """3x3 modulated deformable convolution (DCNv2) backed by torchvision."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out_h = (h - 1) // self.stride + 1
        out_w = (w - 1) // self.stride + 1
        offset, mask = _fit_offsets(offset, mask, out_h, out_w)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return deform_conv2d(
                x.float(),
                offset.float(),
                self.weight.float(),
                self.bias.float(),
                stride=self.stride,
                padding=1,
                mask=mask.float(),
            )


class Conv3x3Norm(nn.Module):
    def __init__(self, channels: int, stride: int, groups: int, eps: float):
        super().__init__()
        self.conv = ModulatedDeformConv(channels, channels, stride)
        self.bn = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Dynamic ReLU: max of two channel-wise affine maps predicted from the pooled input."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, 4 * channels),
            HSigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]
        a1, b1, a2, b2 = coeffs.split(self.channels, dim=1)
        # Slopes are centred on (1, 0) with range 2; offsets on 0 with range 1.
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class DyConv(nn.Module):
    """Scale-aware, spatial-aware and task-aware attention over the pyramid (vision path)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        c = cfg.channels
        groups, eps = cfg.group_norm_groups, cfg.group_norm_eps
        # [0]: applied to the coarser level, [1]: same level, [2]: finer level (stride 2).
        self.DyConv = nn.ModuleList(
            [Conv3x3Norm(c, 1, groups, eps), Conv3x3Norm(c, 1, groups, eps), Conv3x3Norm(c, 2, groups, eps)]
        )
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 1, kernel_size=1), nn.ReLU(inplace=True))
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(c, cfg.dyrelu_reduction)
        self.offset = nn.Conv2d(c, 27, kernel_size=3, padding=1)
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        last = len(feats) - 1
        for level, feat in enumerate(feats):
            offset_mask = self.offset(feat)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            parts = [self.DyConv[1](feat, offset, mask)]
            if level > 0:
                parts.append(self.DyConv[2](feats[level - 1], offset, mask))
            if level < last:
                coarse = self.DyConv[0](feats[level + 1], offset, mask)
                parts.append(F.interpolate(coarse, size=feat.shape[-2:], mode="bilinear", align_corners=True))
            gates = self.h_sigmoid(torch.stack([self.AttnConv(p) for p in parts]))
            outs.append((torch.stack(parts) * gates).mean(dim=0))
        return [self.relu(x) for x in outs]


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one set of attention logits."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, clamp: float, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # on both directions' attention weights, training only (GLIP: 0.1)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError("fusion embed_dim must be divisible by the number of heads")
        self.scale = self.head_dim**-0.5
        self.clamp = clamp
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, -1)

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_mask: torch.Tensor):
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        values_v = self._heads(self.values_v_proj(v))
        values_l = self._heads(self.values_l_proj(l))
        if _fused(self, q):
            valid = text_mask.bool()[:, None, None, :]
            # image queries over the real tokens; text queries over every image position (scale folded into q)
            delta_v = self.out_v_proj(self._merge(F.scaled_dot_product_attention(q, k, values_l, valid, scale=1.0)))
            delta_l = self.out_l_proj(self._merge(F.scaled_dot_product_attention(k, q, values_v, scale=1.0)))
            return delta_v, delta_l
        logits = _clamp(q @ k.transpose(-1, -2), self.clamp)  # (B, H, Nv, Nl)

        # Text queries attend over every image position (padding included).
        logits_t = logits.transpose(-1, -2)
        logits_t = _clamp(logits_t - logits_t.amax(dim=-1, keepdim=True), self.clamp)
        attn_l = logits_t.softmax(dim=-1)

        # Image queries attend over the real (unpadded) tokens only.
        valid = text_mask.bool()[:, None, None, :]
        attn_v = logits.masked_fill(~valid, torch.finfo(logits.dtype).min).softmax(dim=-1)

        attn_v = F.dropout(attn_v, self.dropout, self.training)
        attn_l = F.dropout(attn_l, self.dropout, self.training)
        delta_v = self.out_v_proj(self._merge(attn_v @ values_l))
        delta_l = self.out_l_proj(self._merge(attn_l @ values_v))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    """Pre-norm bidirectional attention with layer scale; residual on the normalised inputs."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        v_dim, l_dim = cfg.channels, cfg.text.hidden_size
        init = 1.0 / cfg.dyhead_layers
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, cfg.fusion_embed_dim, cfg.fusion_heads, cfg.clamp_value,
                                         cfg.fusion_dropout)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init))

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_mask: torch.Tensor):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, text_mask)
        return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l


class VLFuse(nn.Module):
    """Early fusion: all pyramid levels are flattened into one visual sequence."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.b_attn = BiAttentionBlock(cfg)

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        shapes = [f.shape[-2:] for f in feats]
        seq = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)
        seq, text = self.b_attn(seq, text, text_mask)
        seq = seq.transpose(1, 2)
        out, start = [], 0
        for h, w in shapes:
            out.append(seq[:, :, start : start + h * w].reshape(seq.shape[0], -1, h, w))
            start += h * w
        return out, text


class _SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, clamp: float, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.clamp = clamp
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.num_heads

        def heads(t):
            return t.view(b, n, self.num_heads, hd).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if _fused(self, q):
            ctx = F.scaled_dot_product_attention(q, k, v, text_mask.bool()[:, None, None, :])
            return ctx.transpose(1, 2).reshape(b, n, d)
        scores = _clamp((q @ k.transpose(-1, -2)) / math.sqrt(hd), self.clamp)
        scores = scores.masked_fill(~text_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        ctx = F.dropout(scores.softmax(dim=-1), self.dropout, self.training) @ v
        return ctx.transpose(1, 2).reshape(b, n, d)


class _SelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.dropout(self.dense(x), self.dropout, self.training) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: TextConfig, clamp: float, dropout: float = 0.0):
        super().__init__()
        self.self = _SelfAttention(cfg, clamp, dropout)
        self.output = _SelfOutput(cfg, dropout)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, text_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig, clamp: float):
        super().__init__()
        if cfg.hidden_act != "gelu":
            raise ValueError("only the exact (erf) GELU used by BERT-base is supported")
        self.clamp = clamp
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _clamp(F.gelu(_clamp(self.dense(x), self.clamp)), self.clamp)


class _Output(nn.Module):
    def __init__(self, cfg: TextConfig, clamp: float, dropout: float = 0.0):
        super().__init__()
        self.clamp = clamp
        self.dropout = dropout
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = F.dropout(_clamp(self.dense(x), self.clamp), self.dropout, self.training)
        return _clamp(self.LayerNorm(x + residual), self.clamp)


class BertFusionLayer(nn.Module):
    """A BERT encoder layer (post-norm) with GLIP's overflow clamps (text path)."""

    def __init__(self, cfg: TextConfig, clamp: float, dropout: float = 0.0):
        super().__init__()
        self.attention = _Attention(cfg, clamp, dropout)
        self.intermediate = _Intermediate(cfg, clamp)
        self.output = _Output(cfg, clamp, dropout)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, text_mask)
        return self.output(self.intermediate(x), x)


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class VLDyHead(nn.Module):
    """Fusion tower plus box / centerness / token-alignment predictors."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        if cfg.anchors_per_location != 1:
            raise ValueError("GLIP's dot-product head supports exactly one anchor per location")
        c = cfg.channels
        tower: list[nn.Module] = []
        for _ in range(cfg.dyhead_layers):
            tower += [VLFuse(cfg), BertFusionLayer(cfg.text, cfg.clamp_value, cfg.head_text_dropout), DyConv(cfg)]
        self.dyhead_tower = nn.ModuleList(tower)
        self.clamp = cfg.clamp_value

        # Present in the checkpoint but unused by the grounding model.
        self.cls_logits = nn.Conv2d(c, cfg.legacy_num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(c, 4, kernel_size=1)
        self.centerness = nn.Conv2d(c, 1, kernel_size=1)
        prior_bias = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias)

        self.dot_product_projection_text = nn.Linear(cfg.text.hidden_size, c)
        self.log_scale = nn.Parameter(torch.tensor([cfg.log_scale_init]))
        self.bias_lang = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.bias0 = nn.Parameter(torch.tensor([prior_bias]))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(cfg.num_levels))

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        """Returns (box deltas, centerness logits, token logits) per level.

        Shapes per level: (B, 4, H, W), (B, 1, H, W) and (B, H*W, L).
        """
        tower = self.dyhead_tower
        for i in range(0, len(tower), 3):
            feats, text = tower[i](feats, text, text_mask)
            text = tower[i + 1](text, text_mask)
            feats = tower[i + 2](feats)

        tokens = F.normalize(text, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(tokens / 2.0)  # (B, L, C)
        token_bias = tokens @ self.bias_lang + self.bias0  # (B, L)
        temperature = self.log_scale.exp()

        deltas, centerness, token_logits = [], [], []
        for level, x in enumerate(feats):
            deltas.append(self.scales[level](self.bbox_pred(x)))
            centerness.append(self.centerness(x))
            queries = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
            logits = queries @ proj_tokens.transpose(1, 2) / temperature + token_bias[:, None, :]
            token_logits.append(_clamp(logits, self.clamp))
        return deltas, centerness, token_logits
