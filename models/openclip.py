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

from labelmill.models.common import WeightsError, config_hash, file_sha256
from labelmill.models.safe_load import check_finite, is_torchscript, peek_keys, read_tensors

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
    cached = _hub_cached(tag_cfg, cache_dir)
    if cached is not None:
        return cached, f"{arch}@{pretrained}", tag_cfg
    why = hub_unreachable(tag_cfg.get("url") if not tag_cfg.get("hf_hub") else None)
    if why is not None:  # say so at once: no download retries against a hub that cannot answer
        raise WeightsError(
            f"open_clip weights {arch}/{pretrained} are not in the local cache and cannot be downloaded: {why}. "
            "Fetch them where the hub is reachable and copy the Hugging Face cache (HF_HOME) here, or set "
            "'pretrained' to a local checkpoint file."
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


def _hub_cached(tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """A tag's weights file when it is already in the local Hugging Face cache (no network is touched)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    model_id, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    names = [filename.replace("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
             filename.replace(".bin", ".safetensors"), filename]
    for name in dict.fromkeys(names):
        got = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
        if isinstance(got, str) and os.path.isfile(got):
            return got
    return None


def hub_unreachable(url: str | None = None, timeout_s: float = 3.0) -> str | None:
    """Why weights cannot be downloaded right now (offline mode, no route to the hub), or None.

    ``HF_HUB_OFFLINE`` is honoured; otherwise one TCP connection to the hub (``HF_ENDPOINT``, or the
    host of ``url``) within ``timeout_s`` decides, instead of a download's retries and back-off.
    """
    from urllib.parse import urlparse

    if url is None and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    parsed = urlparse(url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    if not host:
        return None
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({type(exc).__name__}: {exc})"
    return None


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
    check_activation(arch, quick_gelu)
    path, label, tag_cfg = resolve_weights(arch, pretrained, allow_random_init=allow_random_init, cache_dir=cache_dir)
    openai_format = path is not None and not tag_cfg and is_openai_checkpoint(path)
    if path is not None and not tag_cfg:
        quick_gelu = resolve_quick_gelu(arch, path, quick_gelu, openai_format)
    kwargs: dict[str, Any] = {}
    if quick_gelu or (quick_gelu is None and tag_cfg.get("quick_gelu")):
        kwargs["force_quick_gelu"] = True
    if path is None:
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
        weights = LoadedWeights(weights=label, sha256=RANDOM_INIT, path=None)
        return model.eval(), weights, open_clip.get_model_preprocess_cfg(model)
    model = open_clip.create_model(arch, pretrained=None, **kwargs)
    if path.endswith((".npz", ".npy")):  # big_vision (SigLIP) arrays: open_clip's converter, no pickle
        try:
            open_clip.load_checkpoint(model, path)
        except Exception as exc:
            raise WeightsError(f"loading CLIP weights {path!r} into {arch!r} failed: {_first_line(exc)}") from None
        check_finite(model.state_dict(), path)
    else:
        state = openai_state_dict(path) if openai_format else read_tensors(path)
        check_finite(state, path)
        try:
            _load_into(model, state)
        except Exception as exc:
            raise WeightsError(f"loading CLIP weights {path!r} into {arch!r} failed: {_first_line(exc)}") from None
    weights = LoadedWeights(weights=label, sha256=_cached_sha(path), path=path)
    return model.eval(), weights, open_clip.get_model_preprocess_cfg(model)


#: entries of OpenAI's released state dicts that open_clip's own files do not have
_OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


def check_activation(arch: str, quick_gelu: bool | None) -> None:
    """Refuse ``quick_gelu: false`` for an architecture whose config fixes QuickGELU (it would be ignored)."""
    import open_clip

    if quick_gelu is False and (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        raise WeightsError(f"quick_gelu: false conflicts with {arch!r}, whose config sets QuickGELU; use the "
                           "architecture name without '-quickgelu' for GELU weights")


def resolve_quick_gelu(arch: str, path: str, quick_gelu: bool | None, openai_format: bool | None = None) -> bool | None:
    """The activation for a local checkpoint: never a silent guess.

    OpenAI-format files (see :func:`is_openai_checkpoint`) mean QuickGELU.
    Otherwise the file cannot tell, so unless ``quick_gelu`` is given or the
    architecture's config fixes it (the ``-quickgelu`` names), this raises
    :class:`WeightsError` asking for it.
    """
    import open_clip

    if quick_gelu is not None:
        return quick_gelu
    if openai_format if openai_format is not None else is_openai_checkpoint(path):
        return True  # OpenAI's CLIPs were trained with QuickGELU
    if "quick_gelu" in (open_clip.get_model_config(arch) or {}):
        return None  # the architecture's own setting
    raise WeightsError(
        f"{path!r} is a local checkpoint for {arch!r}, and nothing in it says which activation the weights "
        "were trained with: set quick_gelu: true for OpenAI-trained CLIP weights (QuickGELU), quick_gelu: false "
        "for GELU (most LAION/DataComp open_clip weights), or use the '-quickgelu' architecture name"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """open_clip's own checkpoint fix-ups (``open_clip.load_checkpoint``) on a state dict read safely."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, dict(state))
    if next(iter(state), "").startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        own = getattr(model, name, None)
        if name in state and own is not None and own.ndim != state[name].ndim:
            state[name] = state[name].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def is_openai_checkpoint(path: str) -> bool:
    """True for OpenAI's CLIP release format: a TorchScript archive, or a state dict with its extra entries.

    OpenAI's state dicts carry ``input_resolution``, ``context_length`` and
    ``vocab_size``; open_clip-format files never do. Nothing in the file runs
    (see :mod:`labelmill.models.safe_load`).
    """
    if is_torchscript(path):
        return True
    keys = peek_keys(path)
    return keys is not None and any(k in keys for k in _OPENAI_MARKERS)


def openai_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an OpenAI-format file (the extra entries removed, fp32).

    TorchScript archives are read by a restricted unpickler: their code never
    runs. The attention masks a scripted model keeps as buffers are dropped
    (open_clip builds its own).
    """
    sd = read_tensors(path)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()
            if k not in _OPENAI_MARKERS and not k.endswith("attn_mask")}


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


def fit_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Size that keeps the aspect ratio with short side ``short_side`` and long side at most ``max_long_side``.

    The scale factor is ``min(short_side / short, max_long_side / long)`` and
    sides are rounded half up, as mmcv's ``rescale_size`` does for mmseg's
    ``Resize(keep_ratio=True)``; images are enlarged as well as shrunk.
    """
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def vit_input(
    image: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor, patch: int
) -> torch.Tensor:
    """uint8 (H, W, 3) image -> normalised (3, h', w') ViT input of the resized image.

    The image is resized to ``size`` (bilinear, antialiased when shrinking),
    normalised, then zero-padded at the bottom and right to the next multiple
    of ``patch`` (zero is the mean colour after normalising), as mmseg's
    ``AdaptivePadding(padding='corner')`` does.  The one resize helper for
    MaskCLIP and the ViLD dense embedder.
    """
    x = image.permute(2, 0, 1).float().div(255)
    if tuple(x.shape[1:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = (x - mean) / std
    return pad_to_patch(x, patch)


def pad_to_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(3, h, w) zero-padded at the bottom/right to multiples of ``patch``."""
    h, w = x.shape[-2:]
    ph, pw = -h % patch, -w % patch
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


@dataclass
class DenseFeatures:
    """Outputs of one dense forward.

    ``features``: (B, D, h, w) value-path patch embeddings in CLIP's joint
    space (not normalised).  ``keys``: (B, h*w, C) attention keys of the
    last block after the attention output projection, as MaskCLIP computes
    them for key smoothing.  ``global_embedding``: (B, D) the usual CLIP
    image embedding of the same input, when asked for.
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
    implementation; the keys get the same output projection.  Positional
    embeddings are resized bicubically when the input grid differs from the
    pre-training grid.

    :meth:`forward_list` runs images of different sizes in one forward: each
    keeps its own grid and positional embedding, the token sequences are
    padded to a common length and the padding is masked out of attention,
    so the result of an image does not depend on what it is batched with.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if visual is None or blocks is None or not hasattr(visual, "conv1"):
            raise TypeError("MaskCLIP needs an open_clip VisionTransformer (a ViT model)")
        for block in blocks:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
                raise TypeError(
                    "MaskCLIP's value path needs standard attention blocks (nn.MultiheadAttention); "
                    f"{type(block).__name__} is not supported"
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

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        v = self.visual
        x = v.conv1(pixels)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed(gh, gw).to(x.dtype)
        return v.ln_pre(x), gh, gw

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        if pad_mask is None:
            return block(x)
        y = block.ln_1(x)
        y = block.attn(y, y, y, need_weights=False, key_padding_mask=pad_mask)[0]
        x = x + block.ls_1(y)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def tokens_before_last(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, gh, gw = self._embed(pixels)
        for block in self.visual.transformer.resblocks[:-1]:
            x = block(x)
        return x, gh, gw

    def _last_block(self, x: torch.Tensor, pad_mask: torch.Tensor | None, with_global: bool):
        """Value-path patch features (N, L, D), keys (N, L, C) and the global embedding."""
        v = self.visual
        block = v.transformer.resblocks[-1]
        attn: nn.MultiheadAttention = block.attn
        width = x.shape[-1]
        global_embedding = None
        if with_global:  # the ordinary last block, for the class-token embedding
            global_embedding = v.ln_post(self._block(block, x, pad_mask)[:, 0]) @ v.proj
        y = block.ln_1(x[:, 1:])
        w_q, w_k, w_v = attn.in_proj_weight.split(width, dim=0)
        if attn.in_proj_bias is not None:
            b_q, b_k, b_v = attn.in_proj_bias.split(width, dim=0)
        else:
            b_k = b_v = None
        keys = attn.out_proj(F.linear(y, w_k, b_k))
        value = attn.out_proj(F.linear(y, w_v, b_v))
        tokens = x[:, 1:] + block.ls_1(value)
        tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
        return v.ln_post(tokens) @ v.proj, keys, global_embedding

    def forward(self, pixels: torch.Tensor, with_global: bool = False) -> DenseFeatures:
        x, gh, gw = self.tokens_before_last(pixels)
        tokens, keys, global_embedding = self._last_block(x, None, with_global)
        feats = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return DenseFeatures(features=feats, keys=keys, global_embedding=global_embedding)

    def forward_list(self, images: list[torch.Tensor]) -> list[DenseFeatures]:
        """Dense features of images of any sizes (each (3, h, w), multiples of the patch), one forward."""
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) == 1:
            out = self(torch.stack(images))
            return [DenseFeatures(out.features[i : i + 1], out.keys[i : i + 1]) for i in range(len(images))]
        embedded = [self._embed(im[None]) for im in images]
        length = max(e[0].shape[1] for e in embedded)
        x = torch.cat([F.pad(e[0], (0, 0, 0, length - e[0].shape[1])) for e in embedded])
        pad_mask = torch.ones(len(images), length, dtype=torch.bool, device=x.device)
        for i, e in enumerate(embedded):
            pad_mask[i, : e[0].shape[1]] = False
        for block in self.visual.transformer.resblocks[:-1]:
            x = self._block(block, x, pad_mask)
        tokens, keys, _ = self._last_block(x, pad_mask, False)
        out = []
        for i, (_, gh, gw) in enumerate(embedded):
            n = gh * gw
            feats = tokens[i : i + 1, :n].transpose(1, 2).reshape(1, -1, gh, gw)
            out.append(DenseFeatures(feats, keys[i : i + 1, :n]))
        return out

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
