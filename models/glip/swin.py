"""Swin Transformer image backbone (the ``backbone.body`` of GLIP).

Attribute names follow the official GLIP checkpoint layout
(``patch_embed.proj``, ``layers.<i>.blocks.<j>.attn.qkv``,
``layers.<i>.downsample.reduction``, ``norm<i>`` ...), so a state dict from
``glip_tiny_model_o365_goldg.pth`` loads without renaming.

Feature maps are carried between blocks as channels-last ``(B, H, W, C)``
tensors.  Windows that do not tile a feature map are completed with zeros on
the bottom/right *after* the first LayerNorm of each block (those zero tokens
take part in the un-shifted window attention), exactly as the reference
implementation does; the result therefore depends on the padded input size,
which is why batching groups images by shape (see ``predictor.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwinConfig
from .regularise import DropPath

# Additive attention bias between tokens of different regions after the
# cyclic shift.  The reference uses -100 (not -inf); we keep the same value.
_SHIFT_MASK_VALUE = -100.0


def _relative_position_index(window: int) -> torch.Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) pair of a window."""
    rows = torch.arange(window).repeat_interleave(window)  # token -> row
    cols = torch.arange(window).repeat(window)  # token -> column
    d_row = rows[:, None] - rows[None, :] + (window - 1)
    d_col = cols[:, None] - cols[None, :] + (window - 1)
    return d_row * (2 * window - 1) + d_col


def _to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nWin, window*window, C); H and W must be multiples of window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _shift_region_mask(hp: int, wp: int, window: int, shift: int, device) -> torch.Tensor:
    """Additive mask (nWin, N, N) that keeps shifted windows from mixing regions."""
    region = torch.zeros(hp, wp, device=device)
    bounds = ((0, hp - window), (hp - window, hp - shift), (hp - shift, hp))
    col_bounds = ((0, wp - window), (wp - window, wp - shift), (wp - shift, wp))
    label = 0
    for r0, r1 in bounds:
        for c0, c1 in col_bounds:
            region[r0:r1, c0:c1] = label
            label += 1
    ids = _to_windows(region[None, :, :, None], window).squeeze(-1)  # (nWin, N)
    differs = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, _SHIFT_MASK_VALUE)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Persistent: the official checkpoints store this index.
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            # Windows are ordered (image, window); view q/k/v with a separate
            # window axis so the per-window mask broadcasts over images.
            n_win = mask.shape[0]
            q, k, v = (t.reshape(bw // n_win, n_win, heads, n, -1) for t in (q, k, v))
            bias = bias[None] + mask[:, None]  # (nWin, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, eps: float,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        b, h, w, c = x.shape
        win = self.window
        y = self.norm1(x)
        pad_b, pad_r = (-h) % win, (-w) % win
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_to_windows(y, win), shift_mask if self.shift else None)
        y = _from_windows(y, win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation followed by a linear reduction (C -> 2C)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Order (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, cfg: SwinConfig, downsample: bool,
                 drop_paths: list[float] | None = None):
        super().__init__()
        self.window = cfg.window_size
        self.shift = cfg.window_size // 2
        rates = drop_paths or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, cfg.window_size, 0 if i % 2 == 0 else self.shift, cfg.mlp_ratio, cfg.layer_norm_eps,
                      rates[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, cfg.layer_norm_eps) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = x.shape[1:3]
        win = self.window
        hp, wp = -(-h // win) * win, -(-w // win) * win
        mask = _shift_region_mask(hp, wp, win, self.shift, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        down = self.downsample(x) if self.downsample is not None else None
        return x, down


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, eps: float):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Returns the normalised outputs of stages 2..4 (strides 8, 16, 32) as NCHW maps.

    The stride-4 stage output is not returned: GLIP's "RETINANET" FPN variant
    does not use it (its output norm is an Identity, hence no ``norm0`` keys).
    """

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, cfg.layer_norm_eps)
        n = len(cfg.depths)
        dims = cfg.stage_channels
        # stochastic depth grows linearly from 0 to drop_path_rate over all blocks (Swin's rule)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(n)]
        self.layers = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg, downsample=i < n - 1,
                      drop_paths=rates[starts[i] : starts[i] + cfg.depths[i]]) for i in range(n)
        )
        for i in range(1, n):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i], eps=cfg.layer_norm_eps))
        self.out_channels = dims[1:]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.layers):
            y, x = stage(x)
            if i > 0:
                outs.append(getattr(self, f"norm{i}")(y).permute(0, 3, 1, 2).contiguous())
        return outs
