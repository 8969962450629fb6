"""MaskCLIP: dense open-vocabulary masks from a frozen CLIP ViT.

labelmill follows the published method (Zhou et al., ECCV 2022, and its
mmseg implementation) by default:

* the image is resized keeping its aspect ratio (short side ``image_size``,
  long side at most ``whole_max_long_side``), padded only to a multiple of
  the patch size, and the positional embeddings are interpolated to its grid;
* the patch tokens of the last block take the value path (no query/key
  attention, see :class:`labelmill.models.openclip.DenseCLIP`) into CLIP's
  joint space, where the prompt-ensemble text classifier gives every patch
  the cosine similarity to every class: the head's output;
* **prompt denoising**: classes whose best patch probability
  (softmax of ``logit_scale`` x cosine) stays below the threshold get a
  cosine of -100;
* **key smoothing**: the probabilities of patches whose top probability is
  below the threshold are replaced by ``W @ probs`` with ``W = K K^T``, where
  the last block's keys ``K`` (after the attention output projection) are
  L2-normalised over the positions;
* the head's output is upsampled bilinearly to the resized image, then to
  the original size, and the argmax over classes is the label;
* ``slide`` mode runs windows of ``slide_crop`` every ``slide_stride`` pixels
  over the resized image and averages their upsampled outputs in pixel space,
  as mmseg's ``slide_inference`` does.

The named options that differ from the reference (``key_smoothing.rule:
cosine``, ``prompt_denoising.keep_all_if_none_pass``, ``candidate_topk``,
``label_resolution``) are documented in the README's MaskCLIP section.

Post-processing (upsampling, argmax, per-class areas, boxes and scores) runs
as torch ops on the teacher's device, and so do the column-major runs of
the label maps (:mod:`labelmill.teachers.rle`); one device-to-host copy per
batch brings back the per-class statistics and the runs, and only the
compression of the runs into COCO RLE strings runs on the CPU.
``predict_async`` queues all of that and starts the copy on a side stream;
the label stage encodes the masks on its finishing thread while the next
batch's forward runs.  On CPU, the label maps themselves are computed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from labelmill.models.common import autocast_dtype
from labelmill.models.transfer import HostCopy
from labelmill.models.openclip import (
    DenseCLIP,
    DenseFeatures,
    encode_text_trimmed,
    fit_size,
    pad_to_patch,
    vit_input,
)
from labelmill.schemas.records import Label, Provenance, TeacherOutput
from labelmill.schemas.raw import RawBatch
from labelmill.teachers.base import FinishInfo, ImageBatch, Pending, Teacher
from labelmill.teachers.configs import CLIPModelFields, MaskCLIPConfig, VocabularyFile
from labelmill.teachers.labelmap import pruned_argmax, pruned_labels, resample
from labelmill.teachers.rle import run_starts
from labelmill.teachers.vocab import load_templates, load_vocabulary, text_classifier


@dataclass
class ScoreMap:
    """The head's output for one image, before upsampling.

    ``logits`` is (C, h, w): on the model's patch grid in whole mode, on the
    resized image's pixels in slide mode (windows already averaged).  The
    reference upsamples it bilinearly to ``work_hw`` (the resized image; in
    whole mode the grid, padding included, is stretched over it, as mmseg
    does) and then to the original size.  With key smoothing the values are
    smoothed probabilities, without it cosine similarities.
    """

    logits: torch.Tensor
    work_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    #: whole mode: (D, Gh, Gw) value-path features in CLIP's joint space (not normalised);
    #: a later teacher (ViLD dense mode) pools region embeddings from them.  None in slide mode.
    features: torch.Tensor | None = None
    #: grid cells the image covers, (rh / patch, rw / patch): original pixel x sits at x * extent[1] / W
    extent: tuple[float, float] | None = None
    #: ``weights@sha256`` of the CLIP that computed ``features``
    weights_id: str | None = None


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """mmseg's ``resize``: bilinear, ``align_corners=False``, of (C, h, w) to (C, *size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def slide_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side, as mmseg's ``slide_inference`` places them."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(n)]


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
        self.autocast_dtype = autocast_dtype(config.precision, device)

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

    #: bound on the floats of one upsampled channel chunk in post-processing
    CHUNK_ELEMENTS = 1 << 25

    def __init__(self, config: MaskCLIPConfig, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        import open_clip

        self.dense = DenseCLIP(self.clip).to(device)
        self.patch = int(self.dense.patch_size[0])
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

    # ----------------------------------------------------------------- head
    def head(self, features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """MaskCLIP's head with its refinements: (D, h, w) features, (h*w, C) keys -> (C, h, w)."""
        cfg = self.config
        d, gh, gw = features.shape
        feats = F.normalize(features.float().flatten(1), dim=0)  # (D, L)
        out = self.classifier.float() @ feats  # cosine similarities (C, L)
        pd = cfg.prompt_denoising
        if pd.enabled:
            best = (out * self.logit_scale).softmax(dim=0).amax(dim=1)  # (C,)
            drop = best < pd.threshold
            if pd.keep_all_if_none_pass:  # without a host sync: drop nothing when all would go
                drop = drop & ~drop.all()
            out = out.masked_fill(drop[:, None], -100.0)
        ks = cfg.key_smoothing
        if ks.enabled:
            probs = (out * self.logit_scale).softmax(dim=0)  # (C, L)
            k = keys.float()
            if ks.rule == "reference":
                k = F.normalize(k, dim=0)  # over positions, as F.normalize(k, p=2) on [N, HW, C]
                weight = k @ k.T
            else:
                k = F.normalize(k, dim=1)
                weight = (k @ k.T).clamp_min(0)
                weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
            smoothed = probs @ weight.T
            unsure = probs.amax(dim=0, keepdim=True) < ks.threshold
            out = torch.where(unsure, smoothed, probs)
        return out.view(-1, gh, gw)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-pixel class probabilities (C, ...) from head outputs (C, ...).

        Without key smoothing the outputs are cosines: softmax of
        ``logit_scale`` x cosine (CLIP's probabilities).  With it they are
        smoothed probabilities, renormalised over classes (negatives as 0).
        """
        if not self.config.key_smoothing.enabled:
            return (logits.float() * self.logit_scale).softmax(dim=0)
        pos = logits.float().clamp_min(0)
        return pos / pos.sum(dim=0, keepdim=True).clamp_min(1e-12)

    # --------------------------------------------------------------- scores
    def _inputs(self, batch: ImageBatch, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resized, normalised image ``i`` (not padded) and its size."""
        cfg = self.config
        h, w = batch.orig_hw[i]
        if cfg.mode == "whole":
            size = fit_size(h, w, cfg.image_size, cfg.whole_max_long_side)
        else:
            size = fit_size(h, w, cfg.slide_short_side, cfg.slide_max_long_side)
        return vit_input(batch.image(i), size, self.mean, self.std, 1), size

    @torch.inference_mode()
    def _forward(self, images: list[torch.Tensor]) -> list[DenseFeatures]:
        out: list[DenseFeatures] = []
        step = self.config.window_batch_size
        for start in range(0, len(images), step):
            with self.autocast():
                out += self.dense.forward_list([pad_to_patch(x, self.patch) for x in images[start : start + step]])
        return out

    @torch.inference_mode()
    def score_maps(self, batch: ImageBatch) -> list[ScoreMap]:
        """The head's output for every image of the batch (see :class:`ScoreMap`)."""
        cfg, p = self.config, self.patch
        prepared = [self._inputs(batch, i) for i in range(len(batch))]
        maps = []
        if cfg.mode == "whole":
            dense = self._forward([x for x, _ in prepared])
            for i, ((_, (rh, rw)), df) in enumerate(zip(prepared, dense)):
                maps.append(ScoreMap(
                    logits=self.head(df.features[0], df.keys[0]), work_hw=(rh, rw), orig_hw=tuple(batch.orig_hw[i]),
                    features=df.features[0].float(), extent=(rh / p, rw / p), weights_id=self.weights_id,
                ))
            return maps
        crop, stride = cfg.slide_crop, cfg.slide_stride
        windows: list[tuple[int, int, int, int, int]] = []  # image, y1, y2, x1, x2
        for i, (x, (rh, rw)) in enumerate(prepared):
            for y1 in slide_starts(rh, crop, stride):
                for x1 in slide_starts(rw, crop, stride):
                    windows.append((i, y1, min(y1 + crop, rh), x1, min(x1 + crop, rw)))
        dense = self._forward([prepared[i][0][:, y1:y2, x1:x2] for i, y1, y2, x1, x2 in windows])
        sums = [torch.zeros(len(self.vocabulary), rh, rw, device=self.device) for _, (rh, rw) in prepared]
        counts = [torch.zeros(1, rh, rw, device=self.device) for _, (rh, rw) in prepared]
        for (i, y1, y2, x1, x2), df in zip(windows, dense):
            out = upsample(self.head(df.features[0], df.keys[0]), (y2 - y1, x2 - x1))
            sums[i][:, y1:y2, x1:x2] += out
            counts[i][:, y1:y2, x1:x2] += 1
        for i, (_, hw) in enumerate(prepared):
            maps.append(ScoreMap(logits=sums[i] / counts[i], work_hw=hw, orig_hw=tuple(batch.orig_hw[i])))
        return maps

    def seg_logits(self, sm: ScoreMap, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The head's output upsampled as the reference does: to the resized image, then to ``size``
        (both bilinear resizes folded into one, :func:`labelmap.resample`; equal to two
        ``F.interpolate`` calls up to float rounding, and to the label maps' values exactly)."""
        return resample(sm.logits, sm.work_hw, size or sm.orig_hw)

    def class_scores(self, batch: ImageBatch, size: Literal["grid", "original"] | tuple[int, int] = "original"):
        """Per-pixel class probabilities before any threshold (see :meth:`confidence`).

        One float tensor (C, H, W) per image, C = vocabulary size, at the
        original image size (``"original"``), an explicit ``(H, W)``, or
        the head's own resolution (``"grid"``).  The argmax over classes is
        the label; rows sum to 1 over classes.
        """
        out = []
        for sm in self.score_maps(batch):
            if size == "grid":
                out.append(self.confidence(sm.logits))
            else:
                target = sm.orig_hw if size == "original" else tuple(size)
                out.append(self.confidence(self.seg_logits(sm, target)))
        return out

    # -------------------------------------------------------------- labels
    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        return self.predict_split(batch, upstream)

    def predict_async(self, batch: ImageBatch, upstream) -> Pending:
        """:meth:`infer_async`, then the host side's masks once the copy has landed (one process)."""
        pending, info = self.infer_async(batch, upstream, None), FinishInfo.of(batch)

        def finish() -> list[TeacherOutput]:
            raw = pending.result()
            outs = self.host.finish(raw, info)
            for out, extras in zip(outs, raw.extras):
                out.extras.update(extras)
            return outs

        return Pending(finish)

    def infer_async(self, batch: ImageBatch, upstream, prepared) -> Pending:
        """The forward, label maps, statistics and runs queued on the device, and the batch's one copy
        back started; the :class:`Pending` waits for that copy and gives the raw arrays
        (:class:`~labelmill.teachers.hosts.MaskCLIPHost` turns them into masks).

        On CPU every step is host work: the label maps are computed by ``result()`` itself, on the
        infer stage's collecting thread, beside the next batch's forward."""
        maps = self.score_maps(batch)
        extras = [{"score_map": sm} for sm in maps]
        if self.device.type == "cpu":
            return Pending(lambda: self.queue_raw(maps, extras)())
        return Pending(self.queue_raw(maps, extras))

    def _scan(self, sm: ScoreMap, channels: torch.Tensor, classes: torch.Tensor | None, size: tuple[int, int],
              normalise: bool):
        """Resample ``channels`` in chunks: running argmax over the first ``len(classes)`` (labelled
        ``classes``) and, if ``normalise``, the running normaliser over all of them."""
        key = self.config.key_smoothing.enabled
        n_arg = 0 if classes is None else len(classes)
        step = max(1, self.CHUNK_ELEMENTS // max(1, size[0] * size[1]))
        best = arg = norm = None
        for start in range(0, len(channels), step):
            chunk = resample(channels[start : start + step], sm.work_hw, size)
            if normalise:
                # key smoothing: confidence = clamp(x, 0) / sum clamp(x, 0); else softmax(scale x)
                part = chunk.clamp_min(0).sum(dim=0) if key else torch.logsumexp(chunk * self.logit_scale, dim=0)
                norm = part if norm is None else (norm + part if key else torch.logaddexp(norm, part))
            if start >= n_arg:
                continue
            val, idx = chunk[: n_arg - start].max(dim=0)
            idx = classes[idx + start]
            if best is None:
                best, arg = val, idx
            else:
                better = val > best
                best, arg = torch.where(better, val, best), torch.where(better, idx, arg)
        return best, arg, norm

    def _candidates(self, logits: torch.Tensor) -> torch.Tensor:
        k = self.config.candidate_topk
        c = logits.shape[0]
        if k <= 0 or k >= c:
            return torch.arange(c, device=logits.device)
        top = logits.flatten(1).topk(k, dim=0).indices.flatten()
        present = torch.zeros(c, dtype=torch.bool, device=logits.device)
        present[top] = True
        return present.nonzero().flatten()

    @torch.inference_mode()
    def label_map(self, sm: ScoreMap) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: (H, W) class index per pixel (C = unlabelled) and its probability."""
        cfg = self.config
        H, W = sm.orig_hw
        if cfg.label_resolution and max(H, W) > cfg.label_resolution:
            lh, lw = fit_size(H, W, cfg.label_resolution, cfg.label_resolution)
            lh, lw = min(lh, H), min(lw, W)
        else:
            lh, lw = H, W
        c = len(self.vocabulary)
        size = (lh, lw)
        if cfg.candidate_topk > 0:  # approximate: the normaliser also sees only the candidates
            cand = self._candidates(sm.logits)
            best, arg, norm = self._scan(sm, sm.logits[cand], cand, size, normalise=True)
        elif sm.logits.device.type != "cpu":
            # on an accelerator every class is cheap, and pruning would cost a host sync per image
            every = torch.arange(c, device=sm.logits.device)
            best, arg, norm = self._scan(sm, sm.logits, every, size, normalise=True)
        elif cfg.key_smoothing.enabled:  # exact: only classes that may win, or change sign, per tile
            best, arg, norm = pruned_labels(sm.logits, sm.work_hw, size, clamp_sum=True)
        else:  # exact softmax: the argmax as above; every class feeds the log-sum-exp
            best, arg = pruned_argmax(sm.logits, sm.work_hw, size)
            _, _, norm = self._scan(sm, sm.logits, None, size, normalise=True)
        if cfg.key_smoothing.enabled:
            conf = best.clamp_min(0) / norm.clamp_min(1e-12)
        else:
            conf = torch.exp(best * self.logit_scale - norm)
        if cfg.pixel_threshold > 0:
            arg = torch.where(conf < cfg.pixel_threshold, c, arg)
        if (lh, lw) != (H, W):  # nearest-neighbour upsampling to the original size
            rows = ((torch.arange(H, device=arg.device) + 0.5) * lh / H).long()
            cols = ((torch.arange(W, device=arg.device) + 0.5) * lw / W).long()
            arg, conf = arg[rows][:, cols], conf[rows][:, cols]
        return arg, conf

    def labels_from_maps(self, maps: list[ScoreMap]) -> list[list[Label]]:
        """Masks of every image: label maps, per-class statistics and the maps' column-major runs on
        the device, one copy of statistics and runs to the host, RLE compression on the CPU."""
        raw = self.queue_raw(maps)()
        return [out.labels for out in self.host.finish(raw, FinishInfo([""] * len(maps), [sm.orig_hw for sm in maps],
                                                                     [None] * len(maps), [{}] * len(maps)))]

    @torch.inference_mode()
    def queue_raw(self, maps: list[ScoreMap], extras: list[dict] | None = None) -> Callable[[], RawBatch]:
        """Queue the label maps, statistics and runs on the device and start their one copy to the host;
        the returned function waits for the copy and cuts it into the batch's raw arrays (vectorised)."""
        c = len(self.vocabulary)
        stats_all, flats, layout = [], [], []
        for sm in maps:
            arg, conf = self.label_map(sm)
            H, W = arg.shape
            flat = arg.flatten()
            n = torch.bincount(flat, minlength=c + 1).double()
            score = torch.zeros(c + 1, dtype=torch.float64, device=flat.device).index_add_(0, flat, conf.flatten().double())
            pix = torch.arange(H * W, device=flat.device)
            ys, xs = (pix // W).double(), (pix % W).double()
            big = float(H * W + 1)
            lo = torch.full((2, c + 1), big, dtype=torch.float64, device=flat.device)
            hi = torch.full((2, c + 1), -1.0, dtype=torch.float64, device=flat.device)
            lo[0].scatter_reduce_(0, flat, xs, "amin")
            lo[1].scatter_reduce_(0, flat, ys, "amin")
            hi[0].scatter_reduce_(0, flat, xs, "amax")
            hi[1].scatter_reduce_(0, flat, ys, "amax")
            stats_all.append(torch.stack([n, score, lo[0], lo[1], hi[0], hi[1]]))  # (6, C+1)
            flats.append(arg.T.flatten())  # column-major, as COCO RLE counts
            layout.append((H, W))
        b = len(maps)
        if not maps:
            empty = np.zeros(0, np.int64)
            return lambda: RawBatch.from_counts(
                {"stats": np.zeros((0, 6, c + 1)), "starts": empty, "values": empty, "hw": np.zeros((0, 2), np.int64)},
                {"stats": empty, "starts": empty, "values": empty, "hw": empty}, extras=[])
        starts, values = run_starts(torch.cat(flats), [h * w for h, w in layout])
        n_stats = b * 6 * (c + 1)
        nr = len(starts)
        # the one device-to-host copy of the batch, on a side stream: the next forward is not held up
        copy = HostCopy(torch.cat([torch.stack(stats_all).flatten(), starts.double(), values.double()]))

        def finish() -> RawBatch:
            host = copy.get().numpy()
            starts_h = host[n_stats : n_stats + nr].astype(np.int64)
            borders = np.cumsum([0] + [h * w for h, w in layout])
            runs = np.diff(np.searchsorted(starts_h, borders))  # runs per image
            ones = np.ones(b, np.int64)
            return RawBatch.from_counts(
                {"stats": host[:n_stats].reshape(b, 6, c + 1), "hw": np.array(layout, np.int64).reshape(b, 2),
                 "starts": starts_h - np.repeat(borders[:-1], runs), "values": host[n_stats + nr :].astype(np.int64)},
                {"stats": ones, "hw": ones, "starts": runs, "values": runs}, extras=extras)

        return finish
