"""MaskCLIP: dense open-vocabulary masks from a frozen CLIP ViT.

The image goes through open_clip's ViT; the patch tokens of the last block
take the value path (no query/key attention, see
:class:`labelmill.models.openclip.DenseCLIP`) and land in CLIP's joint space,
where a prompt-ensemble text classifier scores every patch.  Two optional
refinements from the paper:

* **prompt denoising**: classes whose best patch probability in an image
  (window) stays below ``prompt_denoising.threshold`` are removed;
* **key smoothing**: a patch's class probabilities are replaced by the
  average over patches with similar attention keys (cosine similarity,
  negative similarities ignored, weights normalised), for patches whose top
  probability is below ``key_smoothing.threshold`` (1.0 smooths every patch).
  The reference code normalises keys over the token axis and uses raw
  similarities; labelmill uses cosine similarity so the result stays a
  probability distribution.

Inference is either ``whole`` (the image letterboxed into one square of
``image_size``) or ``slide`` (resized so its short side is
``slide_short_side``, then square windows of ``slide_crop`` at
``slide_stride``, probabilities averaged where windows overlap).

:meth:`MaskCLIPTeacher.class_scores` returns the per-pixel class
probabilities before any threshold, which MaskCLIP+ self-training and
analysis use.  :meth:`predict` turns them into one mask per class present,
each with a confidence (the mean probability of that class over its mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator

from labelmill.models.openclip import DenseCLIP, encode_text_trimmed, load_clip
from labelmill.schemas.records import Label, Provenance, TeacherOutput
from labelmill.teachers.base import ImageBatch, ImageRequest, Teacher, TeacherConfig
from labelmill.teachers.vocab import load_templates, load_vocabulary, text_classifier


class Refinement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    threshold: float = Field(ge=0, le=1)


class VocabularyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str


class CLIPModelFields(TeacherConfig):
    """How to build and load the open_clip model (shared with the ViLD embedder)."""

    model: str = Field(default="ViT-B-16", description="open_clip architecture or hf-hub:org/repo")
    pretrained: str | None = Field(
        default="openai", description="open_clip pretrained tag or a local checkpoint file"
    )
    arch_config: dict | None = Field(default=None, description="inline open_clip model config (custom archs)")
    quick_gelu: bool | None = None
    cache_dir: str | None = None
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def preflight(self, allow_random_init: bool) -> None:
        from labelmill.models.openclip import resolve_weights

        if self.arch_config is None and not self.model.startswith("hf-hub:"):
            resolve_weights(self.model, self.pretrained, allow_random_init=allow_random_init, cache_dir=self.cache_dir)
        elif self.pretrained is None and not allow_random_init:
            name = "inline arch_config" if self.arch_config is not None else self.model
            resolve_weights(name, None, allow_random_init=False)

    def load(self, allow_random_init: bool):
        return load_clip(
            self.model,
            self.pretrained,
            arch_config=self.arch_config,
            allow_random_init=allow_random_init,
            quick_gelu=self.quick_gelu,
            cache_dir=self.cache_dir,
        )


class MaskCLIPConfig(CLIPModelFields):
    type: Literal["maskclip"] = "maskclip"
    vocabulary: str | list[str] | VocabularyFile = "coco-stuff-171"
    background: list[str] = Field(default_factory=list, description="classes whose pixels give no mask")
    templates: str | list[str] = "maskclip85"
    logit_scale: float | None = Field(default=None, gt=0, description="default: the model's own")
    mode: Literal["whole", "slide"] = "whole"
    image_size: int = Field(default=224, ge=32, description="whole mode: side of the letterboxed square")
    slide_short_side: int = Field(default=448, ge=32)
    slide_max_long_side: int = Field(default=896, ge=32)
    slide_crop: int = Field(default=224, ge=32)
    slide_stride: int = Field(default=112, ge=16)
    window_batch_size: int = Field(default=32, gt=0, description="windows per forward in slide mode")
    key_smoothing: Refinement = Field(default_factory=lambda: Refinement(enabled=True, threshold=1.0))
    prompt_denoising: Refinement = Field(default_factory=lambda: Refinement(enabled=True, threshold=0.5))
    pixel_threshold: float = Field(default=0.0, ge=0, le=1, description="pixels below stay unlabelled")
    candidate_topk: int = Field(
        default=3, ge=0, description="classes in the top-k of some patch are rasterised; 0 = all classes"
    )
    label_resolution: int = Field(
        default=320, ge=0,
        description="long side at which the label map is computed before nearest upsampling; 0 = original size",
    )

    def image_request(self) -> ImageRequest:
        if self.mode == "whole":
            return ImageRequest(short_side=self.image_size, max_long_side=self.image_size)
        return ImageRequest(short_side=self.slide_short_side, max_long_side=self.slide_max_long_side)

    @model_validator(mode="after")
    def _check(self) -> "MaskCLIPConfig":
        if self.slide_stride > self.slide_crop:
            raise ValueError("slide_stride must not exceed slide_crop (windows would leave gaps)")
        return self


@dataclass
class _Window:
    image: int                 # index in the batch
    pixels: torch.Tensor       # (3, c, c) normalised
    valid: tuple[int, int]     # valid grid cells (rows, cols) inside the window
    offset: tuple[int, int]    # window origin in the image's grid, in cells


@dataclass
class ScoreMap:
    """Class probabilities of one image on the patch grid.

    ``probs`` is (C, Gh, Gw).  Original pixel ``(y, x)`` sits at grid
    coordinate ``((y + .5) * extent[0] / H - .5, (x + .5) * extent[1] / W - .5)``
    where ``extent`` is the number of grid cells the image covers (it can
    be fractional in letterboxed whole mode).
    """

    probs: torch.Tensor
    extent: tuple[float, float]
    orig_hw: tuple[int, int]
    #: (D, Gh, Gw) value-path features in CLIP's joint space (not normalised), on the
    #: same grid; a later teacher (ViLD dense mode) pools region embeddings from them.
    features: torch.Tensor | None = None
    #: ``weights@sha256`` of the CLIP that computed ``features``
    weights_id: str | None = None


def bilinear_weights(out_len: int, grid_len: int, extent: float, device) -> torch.Tensor:
    """(out_len, grid_len) matrix resampling a grid axis bilinearly (edges clamped)."""
    pos = (torch.arange(out_len, device=device, dtype=torch.float32) + 0.5) * (extent / out_len) - 0.5
    pos = pos.clamp(0, grid_len - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=grid_len - 1)
    frac = pos - lo
    mat = torch.zeros(out_len, grid_len, device=device)
    rows = torch.arange(out_len, device=device)
    mat.index_put_((rows, lo), 1 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat


def resample(probs: torch.Tensor, extent: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of (C, Gh, Gw) grid probabilities to (C, *size)."""
    ay = bilinear_weights(size[0], probs.shape[1], extent[0], probs.device)
    ax = bilinear_weights(size[1], probs.shape[2], extent[1], probs.device)
    return torch.einsum("yh,chw,xw->cyx", ay, probs.float(), ax)


class CLIPTeacher(Teacher):
    """A teacher built on one open_clip model (MaskCLIP, the ViLD embedder).

    Loads the model once, keeps its normalisation constants as (3, 1, 1)
    tensors, an id of the exact weights, and the autocast dtype the
    ``precision`` setting asks for.
    """

    def __init__(self, config: CLIPModelFields, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        clip, self.weights, self.preprocess_cfg = config.load(allow_random_init)
        self.clip = clip.to(device).requires_grad_(False)
        self.weights_id = f"{self.weights.weights}@{self.weights.sha256}"
        pp = self.preprocess_cfg
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(3, 1, 1)
        self.autocast_dtype = _autocast_dtype(config.precision, device)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def provenance(self) -> Provenance:
        return self.clip_provenance(self.weights.weights, self.weights.sha256)

    def clip_arch_name(self) -> str:
        from labelmill.models.openclip import register_arch

        cfg = self.config
        return register_arch(cfg.arch_config) if cfg.arch_config is not None else cfg.model


class MaskCLIPTeacher(CLIPTeacher):
    Config = MaskCLIPConfig
    type_name = "maskclip"

    def __init__(self, config: MaskCLIPConfig, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        import open_clip

        self.dense = DenseCLIP(self.clip).to(device)
        self.patch = int(self.dense.patch_size[0])
        for name, size in (("slide_crop", config.slide_crop), ("slide_stride", config.slide_stride)):
            if config.mode == "slide" and size % self.patch:
                raise ValueError(f"maskclip.{name}={size} must be a multiple of the patch size {self.patch}")
        self.vocabulary = load_vocabulary(
            config.vocabulary.model_dump() if isinstance(config.vocabulary, VocabularyFile) else config.vocabulary
        )
        unknown_bg = [b for b in config.background if b not in self.vocabulary.names]
        if unknown_bg:
            raise ValueError(f"maskclip.background names {unknown_bg} are not in the vocabulary")
        self.background = {self.vocabulary.index(b) for b in config.background}
        self.templates = load_templates(config.templates)
        arch = self.clip_arch_name()
        tokenizer = open_clip.get_tokenizer(arch)
        self.classifier = text_classifier(
            lambda tokens: encode_text_trimmed(self.clip, tokens),
            tokenizer,
            self.vocabulary,
            self.templates,
            cache_key=f"{self.weights.weights}:{self.weights.sha256}",
            device=device,
        )
        scale = config.logit_scale or float(self.clip.logit_scale.exp().item())
        self.logit_scale = scale

    # ------------------------------------------------------------- windows
    def _normalise(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (3, H, W) normalised."""
        x = img.permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def _resize(self, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (H, W, 3) -> normalised (3, *size)."""
        x = self._normalise(img)
        if tuple(x.shape[1:]) != tuple(size):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x

    def _windows(self, batch: ImageBatch) -> tuple[list[_Window], list[tuple[int, int]], list[tuple[float, float]]]:
        cfg, p = self.config, self.patch
        windows: list[_Window] = []
        grids: list[tuple[int, int]] = []
        extents: list[tuple[float, float]] = []
        for i in range(len(batch)):
            img = batch.image(i)
            h, w = img.shape[:2]
            if cfg.mode == "whole":
                side = cfg.image_size - cfg.image_size % p
                scale = side / max(h, w)
                rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
                canvas = torch.zeros(3, side, side, device=img.device)
                canvas[:, :rh, :rw] = self._resize(img, (rh, rw))
                cells = (math.ceil(rh / p), math.ceil(rw / p))
                windows.append(_Window(i, canvas, cells, (0, 0)))
                grids.append((side // p, side // p))
                extents.append((rh / p, rw / p))
                continue
            scale = min(cfg.slide_short_side / min(h, w), cfg.slide_max_long_side / max(h, w))
            rh = max(p, round(h * scale / p) * p)
            rw = max(p, round(w * scale / p) * p)
            x = self._resize(img, (rh, rw))
            crop = cfg.slide_crop
            ph, pw = max(rh, crop), max(rw, crop)
            if (ph, pw) != (rh, rw):
                x = F.pad(x, (0, pw - rw, 0, ph - rh))  # zero = the mean colour after normalising
            for y1 in _starts(ph, crop, cfg.slide_stride):
                for x1 in _starts(pw, crop, cfg.slide_stride):
                    valid = (min(crop, rh - y1) // p, min(crop, rw - x1) // p)
                    if valid[0] <= 0 or valid[1] <= 0:
                        continue
                    windows.append(_Window(i, x[:, y1 : y1 + crop, x1 : x1 + crop], valid, (y1 // p, x1 // p)))
            grids.append((ph // p, pw // p))
            extents.append((rh / p, rw / p))
        return windows, grids, extents

    # --------------------------------------------------------------- scores
    @torch.inference_mode()
    def _window_probs(self, pixels: torch.Tensor, valid: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(N, 3, c, c) -> (N, C, g, g) class probabilities after the refinements."""
        return self._window_outputs(pixels, valid)[0]

    @torch.inference_mode()
    def _window_outputs(self, pixels: torch.Tensor, valid: Sequence[tuple[int, int]]):
        """Class probabilities (N, C, g, g) and raw dense features (N, D, g, g) of windows."""
        with self.autocast():
            out = self.dense(pixels)
        raw = out.features.float()
        feats = F.normalize(raw, dim=1)
        logits = torch.einsum("ndhw,cd->nchw", feats, self.classifier.float()) * self.logit_scale
        n, c, gh, gw = logits.shape
        cell_mask = torch.zeros(n, gh * gw, dtype=torch.bool, device=logits.device)
        for j, (vh, vw) in enumerate(valid):
            m = torch.zeros(gh, gw, dtype=torch.bool, device=logits.device)
            m[:vh, :vw] = True
            cell_mask[j] = m.flatten()
        cfg = self.config
        if cfg.prompt_denoising.enabled:
            probs = logits.flatten(2).softmax(dim=1)
            best = probs.masked_fill(~cell_mask[:, None], 0).amax(dim=2)  # (n, C)
            drop = best < cfg.prompt_denoising.threshold
            drop &= ~drop.all(dim=1, keepdim=True)  # never drop every class
            logits = logits.masked_fill(drop[:, :, None, None], float("-inf"))
        probs = logits.flatten(2).softmax(dim=1)  # (n, C, L)
        if cfg.key_smoothing.enabled:
            keys = F.normalize(out.keys.float(), dim=-1)  # (n, L, k)
            sim = torch.bmm(keys, keys.transpose(1, 2)).clamp_min_(0)
            sim = sim * cell_mask[:, None, :]  # padded cells never vote
            sim = sim / sim.sum(dim=2, keepdim=True).clamp_min(1e-6)
            smoothed = torch.bmm(probs, sim.transpose(1, 2))  # (n, C, L)
            unsure = probs.amax(dim=1, keepdim=True) < cfg.key_smoothing.threshold
            probs = torch.where(unsure, smoothed, probs)
        return probs.view(n, c, gh, gw), raw

    @torch.inference_mode()
    def score_maps(self, batch: ImageBatch) -> list[ScoreMap]:
        """Class probabilities on the patch grid, one :class:`ScoreMap` per image."""
        windows, grids, extents = self._windows(batch)
        c, d = len(self.vocabulary), self.dense.embed_dim
        sums = [torch.zeros(c, gh, gw, device=self.device) for gh, gw in grids]
        feats = [torch.zeros(d, gh, gw, device=self.device) for gh, gw in grids]
        counts = [torch.zeros(1, gh, gw, device=self.device) for gh, gw in grids]
        step = self.config.window_batch_size if self.config.mode == "slide" else max(1, len(windows))
        for start in range(0, len(windows), step):
            chunk = windows[start : start + step]
            probs, raw = self._window_outputs(torch.stack([w.pixels for w in chunk]), [w.valid for w in chunk])
            for win, pr, fe in zip(chunk, probs, raw):
                oy, ox = win.offset
                gh, gw = pr.shape[1:]
                sums[win.image][:, oy : oy + gh, ox : ox + gw] += pr
                feats[win.image][:, oy : oy + gh, ox : ox + gw] += fe
                counts[win.image][:, oy : oy + gh, ox : ox + gw] += 1
        maps = []
        for i in range(len(batch)):
            n = counts[i].clamp_min(1)
            maps.append(ScoreMap(probs=sums[i] / n, extent=extents[i], orig_hw=tuple(batch.orig_hw[i]),
                                 features=feats[i] / n, weights_id=self.weights_id))
        return maps

    def class_scores(self, batch: ImageBatch, size: Literal["grid", "original"] | tuple[int, int] = "original"):
        """Per-pixel class probabilities before any threshold.

        Returns one float tensor (C, H, W) per image, C = vocabulary size,
        bilinearly resampled from the patch grid to the original image size
        (``"original"``), to an explicit ``(H, W)``, or left on the patch grid
        cropped to the image (``"grid"``).  Rows sum to 1 over classes.
        """
        out = []
        for sm in self.score_maps(batch):
            if size == "grid":
                out.append(sm.probs[:, : math.ceil(sm.extent[0]), : math.ceil(sm.extent[1])])
            else:
                target = sm.orig_hw if size == "original" else tuple(size)
                out.append(resample(sm.probs, sm.extent, target))
        return out

    # -------------------------------------------------------------- labels
    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        maps = self.score_maps(batch)
        outputs = []
        for sm in maps:
            out = TeacherOutput(labels=self._masks(sm))
            out.extras["score_map"] = sm
            outputs.append(out)
        return outputs

    def _candidates(self, probs: torch.Tensor, extent: tuple[float, float]) -> torch.Tensor:
        gh, gw = math.ceil(extent[0]), math.ceil(extent[1])
        valid = probs[:, :gh, :gw].flatten(1)
        k = self.config.candidate_topk
        if k <= 0 or k >= valid.shape[0]:
            present = valid.amax(dim=1) > 0
        else:
            top = valid.topk(k, dim=0).indices.flatten()
            present = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
            present[top] = True
            present &= valid.amax(dim=1) > 0
        return present.nonzero().flatten()

    def _masks(self, sm: ScoreMap) -> list[Label]:
        cfg = self.config
        H, W = sm.orig_hw
        if cfg.label_resolution and max(H, W) > cfg.label_resolution:
            s = cfg.label_resolution / max(H, W)
            lh, lw = max(1, round(H * s)), max(1, round(W * s))
        else:
            lh, lw = H, W
        cand = self._candidates(sm.probs, sm.extent)
        if cand.numel() == 0:
            return []
        probs = resample(sm.probs[cand], sm.extent, (lh, lw))  # (K, lh, lw)
        best, arg = probs.max(dim=0)
        if cfg.pixel_threshold > 0:
            arg = torch.where(best < cfg.pixel_threshold, len(cand), arg)  # K = "unlabelled"
        arg_np = arg.to(torch.int32).flatten().cpu().numpy()
        counts = np.bincount(arg_np, minlength=len(cand) + 1)
        # a pixel's label is its argmax, so the mean probability of class k over
        # its mask is the mean of the per-pixel maximum over those pixels
        sums = np.bincount(arg_np, weights=best.flatten().cpu().numpy().astype(np.float64), minlength=len(cand) + 1)
        present = [k for k in np.nonzero(counts[: len(cand)])[0] if int(cand[k]) not in self.background]
        if not present:
            return []
        label_map = arg_np.reshape(lh, lw).astype(np.uint8 if len(cand) < 255 else np.uint16)
        if (lh, lw) != (H, W):  # nearest-neighbour upsampling to the original size
            rows = ((np.arange(H) + 0.5) * lh / H).astype(np.int64)
            cols = ((np.arange(W) + 0.5) * lw / W).astype(np.int64)
            label_map = np.take(np.take(label_map, rows, axis=0), cols, axis=1)
        full = np.asfortranarray(label_map)  # masks derived from it stay column-major for RLE
        cand_list = cand.tolist()
        labels = []
        for k in present:
            class_id = cand_list[k]
            rle = mask_utils.encode((full == k).view(np.uint8))
            area = float(mask_utils.area(rle))
            if area <= 0:
                continue
            bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
            labels.append(
                Label(
                    kind="mask",
                    score=float(sums[k] / counts[k]),
                    bbox=bbox,
                    class_name=self.vocabulary.names[class_id],
                    class_id=class_id,
                    area=area,
                    rle={"size": [int(H), int(W)], "counts": rle["counts"].decode("ascii")},
                )
            )
        return labels


def _starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins covering ``length`` with windows of ``crop`` every ``stride``."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, length)
        out.append(max(end - crop, 0))
    return sorted(set(out))


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
