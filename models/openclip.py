"""open_clip models for labelmill: weight resolution and the dense value path.

``load_clip`` is the one place where CLIP weights are found.  It accepts an
open_clip ``pretrained`` tag (downloaded where the machine can reach the hub,
or found in the local cache), an ``hf-hub:org/repo`` model id, or a local
checkpoint file.  It never falls back to random weights: that happens only
when the caller passes ``allow_random_init=True`` and no weights at all.

``DenseCLIP`` computes MaskCLIP's dense patch features from the value path
of the last attention block of an open_clip ViT.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from labelmill.schemas.records import Provenance  # noqa: F401  (re-exported for callers)
from labelmill.teachers.base import WeightsError, config_hash, file_sha256

RANDOM_INIT = "random-init"
_SHA_CACHE: dict[tuple[str, int, float], str] = {}


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded: a readable id and the hash of the exact file."""

    weights: str
    sha256: str
    path: str | None


def _cached_sha(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def register_arch(arch_config: dict[str, Any]) -> str:
    """Register an inline open_clip model config; returns the name to build it by."""
    import open_clip

    name = f"labelmill-custom-{config_hash(arch_config)}"
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "labelmill-open-clip-configs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(arch_config))
        open_clip.add_model_config(folder)
    return name


def resolve_weights(
    arch: str, pretrained: str | None, *, allow_random_init: bool = False, cache_dir: str | None = None
) -> tuple[str | None, str, dict[str, Any]]:
    """Find the checkpoint file for ``arch`` without building the model.

    Returns ``(path or None for random init, readable weights id, tag config)``;
    raises :class:`WeightsError` with instructions when there are no weights.
    """
    import open_clip

    if pretrained is None:
        if not allow_random_init:
            raise WeightsError(
                f"no weights given for CLIP {arch!r}: set 'pretrained' to an open_clip tag "
                f"(one of {open_clip.list_pretrained_tags_by_model(arch) or 'none known'}) or to a "
                "local checkpoint file. Random weights are only allowed in `labelmill demo`."
            )
        return None, f"{arch}@{RANDOM_INIT}", {}
    if os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise WeightsError(f"CLIP weights path {pretrained!r} is not a file")
        return pretrained, f"{arch}@{os.path.basename(pretrained)}", {}
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise WeightsError(
            f"{pretrained!r} is neither an existing file nor an open_clip pretrained tag of {arch!r} "
            f"(known tags: {known or 'none'})"
        )
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:  # network, hub, permission: all mean "no weights here"
        raise WeightsError(
            f"could not download open_clip weights {arch}/{pretrained}: {type(exc).__name__}: {exc}. "
            "If this machine is offline, fetch the checkpoint where the hub is reachable "
            f"(open_clip.create_model('{arch}', pretrained='{pretrained}') caches it under "
            "~/.cache/huggingface), copy that cache here, or set 'pretrained' to the file's path."
        ) from exc
    if not path or not os.path.isfile(path):
        raise WeightsError(f"open_clip returned no file for {arch}/{pretrained}")
    return path, f"{arch}@{pretrained}", tag_cfg


def load_clip(
    arch: str,
    pretrained: str | None,
    *,
    arch_config: dict[str, Any] | None = None,
    allow_random_init: bool = False,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, LoadedWeights, dict[str, Any]]:
    """Build an open_clip model and load its weights.

    Returns ``(model, weights, preprocess_cfg)``; the model is in eval mode
    on the CPU.  Raises :class:`WeightsError` with instructions when the
    weights cannot be had.  Random initialisation happens only with
    ``allow_random_init=True`` *and* ``pretrained=None``.
    """
    import open_clip

    if arch_config is not None:
        arch = register_arch(arch_config)
    if arch.startswith("hf-hub:"):
        return _load_hf_hub(arch, cache_dir)
    if arch not in open_clip.list_models():
        raise WeightsError(
            f"open_clip has no architecture {arch!r}; pick one of open_clip.list_models() "
            "or give an inline arch_config"
        )
    path, label, tag_cfg = resolve_weights(arch, pretrained, allow_random_init=allow_random_init, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {}
    if quick_gelu or (quick_gelu is None and tag_cfg.get("quick_gelu")):
        kwargs["force_quick_gelu"] = True
    if path is None:
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
        weights = LoadedWeights(weights=label, sha256=RANDOM_INIT, path=None)
        return model.eval(), weights, open_clip.get_model_preprocess_cfg(model)
    try:
        model = open_clip.create_model(arch, pretrained=path, **kwargs)
    except Exception as exc:
        raise WeightsError(f"loading CLIP weights {path!r} into {arch!r} failed: {exc}") from exc
    weights = LoadedWeights(weights=label, sha256=_cached_sha(path), path=path)
    return model.eval(), weights, open_clip.get_model_preprocess_cfg(model)


def _load_hf_hub(arch: str, cache_dir: str | None):
    import open_clip

    try:
        model = open_clip.create_model(arch, cache_dir=cache_dir)
    except Exception as exc:
        raise WeightsError(
            f"could not load {arch} from the Hugging Face hub: {type(exc).__name__}: {exc}. "
            "Offline machines need the repo in the local HF cache (HF_HOME) or a local checkpoint file."
        ) from exc
    sha = RANDOM_INIT
    try:
        from huggingface_hub import try_to_load_from_cache

        repo = arch[len("hf-hub:"):]
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(cached, str) and os.path.isfile(cached):
                sha = _cached_sha(cached)
                break
    except ImportError:
        pass
    if sha == RANDOM_INIT:
        raise WeightsError(f"{arch}: the weights file could not be located in the HF cache to hash it")
    return model.eval(), LoadedWeights(weights=arch, sha256=sha, path=None), open_clip.get_model_preprocess_cfg(model)


# --------------------------------------------------------------------------
# Dense features
# --------------------------------------------------------------------------


@dataclass
class DenseFeatures:
    """Outputs of one dense forward.

    ``features``: (B, D, h, w) value-path patch embeddings in CLIP's joint
    space (not normalised).  ``keys``: (B, h*w, C) attention keys of the
    last block, for key smoothing.  ``global_embedding``: (B, D) the usual
    CLIP image embedding of the same input, when asked for.
    """

    features: torch.Tensor
    keys: torch.Tensor
    global_embedding: torch.Tensor | None = None


class DenseCLIP(nn.Module):
    """MaskCLIP's dense path over an open_clip ``VisionTransformer``.

    All blocks but the last run unchanged.  In the last block the patch
    tokens skip query-key attention: each token's value vector goes through
    the attention output projection, the residual connection and the MLP,
    then ``ln_post`` and the visual projection, as in the MaskCLIP reference
    implementation.  Positional embeddings are resized bicubically when the
    input grid differs from the pre-training grid.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if visual is None or blocks is None or not hasattr(visual, "conv1"):
            raise TypeError("MaskCLIP needs an open_clip VisionTransformer (a ViT model)")
        last = blocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise TypeError(
                "MaskCLIP's value path needs standard attention blocks (nn.MultiheadAttention); "
                f"{type(last).__name__} is not supported"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("ViTs with attentional pooling are not supported by the dense path")
        self.visual = visual
        self.patch_size = visual.conv1.kernel_size
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.visual.positional_embedding
        n_grid = pos.shape[0] - 1
        side = int(math.isqrt(n_grid))
        if (gh, gw) == (side, side):
            return pos
        key = (gh, gw)
        cached = self._pos_cache.get(key)
        if cached is None or cached.device != pos.device or cached.dtype != pos.dtype:
            grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
            cached = torch.cat([pos[:1], grid], dim=0)
            self._pos_cache[key] = cached
        return cached

    def tokens_before_last(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        v = self.visual
        x = v.conv1(pixels)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed(gh, gw).to(x.dtype)
        x = v.ln_pre(x)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        return x, gh, gw

    def forward(self, pixels: torch.Tensor, with_global: bool = False) -> DenseFeatures:
        v = self.visual
        x, gh, gw = self.tokens_before_last(pixels)
        block = v.transformer.resblocks[-1]
        attn: nn.MultiheadAttention = block.attn
        width = x.shape[-1]

        global_embedding = None
        if with_global:  # the ordinary last block, for the class-token embedding
            global_embedding = v.ln_post(block(x)[:, 0]) @ v.proj

        # value path for the patch tokens
        y = block.ln_1(x[:, 1:])
        w_q, w_k, w_v = attn.in_proj_weight.split(width, dim=0)
        if attn.in_proj_bias is not None:
            b_q, b_k, b_v = attn.in_proj_bias.split(width, dim=0)
        else:
            b_k = b_v = None
        keys = F.linear(y, w_k, b_k)
        value = F.linear(y, w_v, b_v)
        value = attn.out_proj(value)
        tokens = x[:, 1:] + block.ls_1(value)
        tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
        tokens = v.ln_post(tokens) @ v.proj
        feats = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return DenseFeatures(features=feats, keys=keys, global_embedding=global_embedding)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The standard CLIP image embedding (at any input size)."""
        x, _, _ = self.tokens_before_last(pixels)
        x = self.visual.transformer.resblocks[-1](x)
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` without the padding tail: same result, several times faster.

    CLIP's text tower is causal and pools at the end-of-text token, so the
    positions after the longest prompt's EOT cannot influence the output.
    Prompts are short (about 10 tokens of a 77-token context), so the
    transformer runs on the trimmed length.  Models without that structure
    (custom/HF text towers, non-causal masks) go through ``encode_text``.
    """
    simple = (
        hasattr(model, "token_embedding")
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )
    if not simple:
        return model.encode_text(tokens)
    nonzero = (tokens != 0).any(dim=0).nonzero()
    length = max(int(tokens.argmax(dim=-1).max()) + 1, int(nonzero.max()) + 1 if len(nonzero) else 1)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
