"""ViLD region embeddings: CLIP image embeddings of object proposals.

ViLD trains a detector whose region features are pulled towards what a
frozen CLIP image encoder says about each proposal.  Those CLIP targets are
computed once, offline, over the whole dataset; this "teacher" computes them
inside the labelling pipeline and writes them to the ``regions`` table.

Proposals per image come from any mix of
  * the boxes of teachers that ran earlier in the same run (GLIP boxes above
    their score floor, MaskCLIP mask boxes), taken *before* the filter stage;
  * a field of the sample's ``KEY.json`` (external RPN proposals);
  * optionally the whole image.
They are clipped to the image, boxes thinner than ``min_box_size`` dropped,
then merged by class-agnostic NMS and capped at ``max_regions`` (ViLD's
300), highest score first.

Two ways to embed a proposal:

``crop`` (ViLD)
    Each proposal is cut at every scale of ``crop_scales`` (1x and 1.5x
    around its centre, clipped to the image), resampled to the encoder's
    input size and embedded by ``encode_image``.  The per-scale embeddings
    are L2-normalised, summed and normalised again.  Crops are cut on the
    tensor side with RoIAlign (adaptive sampling, so shrinking averages like
    an antialiased resize) and batched across the images of the batch.
    ``crop_resize: stretch`` (default) resizes the whole box to the encoder's
    square input, as the ViLD paper does; ``center_crop`` keeps only the
    central square of the (clipped) box, which is what open_clip's own
    preprocessing (resize shortest side, centre crop) does to a PIL crop of
    the box (the DetPro / open_clip path).  Two documented deviations:
    crops are resampled bilinearly (RoIAlign), where CLIP preprocesses with
    bicubic (cosine 0.9999 between the two); and crops are cut from the
    decoded working copy (short side ``work_short_side``, long side at most
    ``work_max_long_side``), not from the original file, so in photos larger
    than that small boxes carry less detail (raise ``work_short_side`` to
    crop from a larger copy, or set it and ``work_max_long_side`` to null
    to crop from the original).  Every region row records the resolution its
    embeddings came from as ``pixel_scale``.

``dense``
    Not in the references: region embeddings are RoIAlign-pooled from
    MaskCLIP's dense value-path features (the patch tokens mapped into the
    joint space), then normalised.  When a MaskCLIP teacher with the same
    weights ran earlier (``dense_features_from``), its features are reused
    and the regions cost almost nothing; otherwise the embedder runs the
    dense forward itself at ``dense_image_size``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision.ops import nms, roi_align

from labelmill.models.openclip import DenseCLIP, fit_size, vit_input
from labelmill.schemas.records import ImageRequest, RegionSet, TeacherOutput
from labelmill.teachers.base import ImageBatch, TeacherConfig
from labelmill.teachers.maskclip import CLIPModelFields, CLIPTeacher, MaskCLIPConfig

WHOLE_IMAGE = "image"


class Proposals(NamedTuple):
    """The regions one image will embed, after clipping, NMS and the cap."""

    boxes: torch.Tensor      # (N, 4) xyxy, original pixels
    scores: torch.Tensor     # (N,)
    sources: list[str]
    dropped: int             # proposals discarded as empty or too thin


class ProposalSource(BaseModel):
    """Where one kind of proposal comes from: an earlier teacher or the JSON."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(default=None, description="instance name of an earlier teacher")
    meta_field: str | None = Field(default=None, description="field of KEY.json holding boxes")
    box_format: Literal["xyxy", "xywh"] = Field(default="xyxy", description="meta_field boxes only")
    min_score: float = Field(default=0.0, ge=0, description="proposals scoring below are ignored")

    @model_validator(mode="after")
    def _one_source(self) -> "ProposalSource":
        if (self.teacher is None) == (self.meta_field is None):
            raise ValueError("a proposal source names exactly one of 'teacher' or 'meta_field'")
        return self

    @property
    def label(self) -> str:
        """The value written in the ``sources`` column for these proposals."""
        return self.teacher if self.teacher is not None else f"json:{self.meta_field}"


#: An image side no photo reaches: asking for it keeps the original resolution.
ORIGINAL = 1 << 30


class ViLDConfig(CLIPModelFields):
    type: Literal["vild"] = "vild"
    proposals: list[ProposalSource] = Field(
        default_factory=lambda: [ProposalSource(meta_field="proposals")], min_length=1
    )
    whole_image: bool = Field(default=False, description="add the whole image as one more proposal (score 1)")
    nms_iou: float = Field(default=0.7, gt=0, le=1, description="class-agnostic NMS IoU; 1 keeps all")
    max_regions: int = Field(default=300, gt=0, description="cap after NMS (ViLD's max_num_rois)")
    min_box_size: float = Field(default=2.0, ge=0, description="px; thinner proposals are dropped")
    mode: Literal["crop", "dense"] = "crop"
    crop_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5], min_length=1)
    crop_resize: Literal["stretch", "center_crop"] = Field(
        default="stretch", description="stretch: the whole box (ViLD); center_crop: its central square (DetPro)"
    )
    crop_size: int | None = Field(default=None, ge=16, description="encoder input side; default the model's")
    crop_batch_size: int = Field(default=128, gt=0, description="crops per encoder forward")
    work_short_side: int | None = Field(
        default=800, ge=32,
        description="crop mode: crops are cut from a copy with this short side; null cuts them from the original",
    )
    work_max_long_side: int | None = Field(default=1333, ge=32, description="crop mode: that copy's long side at most")
    dense_features_from: str | None = Field(
        default=None, description="dense mode: an earlier MaskCLIP teacher with the same weights"
    )
    dense_image_size: int = Field(default=512, ge=32, description="dense mode without MaskCLIP: short side")
    dense_max_long_side: int = Field(default=2048, ge=32, description="dense mode without MaskCLIP: long side at most")
    dense_roi_size: int = Field(default=4, gt=0, description="RoIAlign bins per side before averaging")

    @model_validator(mode="after")
    def _check(self) -> "ViLDConfig":
        if any(s <= 0 for s in self.crop_scales):
            raise ValueError("crop_scales must be positive")
        if self.dense_features_from is not None and self.mode != "dense":
            raise ValueError("dense_features_from only applies to mode: dense")
        return self

    def image_request(self) -> ImageRequest:
        if self.mode == "crop":
            if self.work_short_side is None:  # the original resolution: a request the decoder never shrinks for
                return ImageRequest(short_side=ORIGINAL, max_long_side=ORIGINAL)
            return ImageRequest(short_side=self.work_short_side, max_long_side=self.work_max_long_side or ORIGINAL)
        if self.dense_features_from is not None:  # pixels are not used: ask for nothing extra
            return ImageRequest(short_side=32, max_long_side=32)
        return ImageRequest(short_side=self.dense_image_size, max_long_side=self.dense_max_long_side)

    def check_upstream(self, earlier: dict[str, TeacherConfig]) -> None:
        for src in self.proposals:
            if src.teacher is not None and src.teacher not in earlier:
                raise ValueError(
                    f"proposals from teacher {src.teacher!r}, which is not listed before this one "
                    f"(earlier teachers: {sorted(earlier) or 'none'})"
                )
        name = self.dense_features_from
        if name is None:
            return
        other = earlier.get(name)
        if not isinstance(other, MaskCLIPConfig):
            raise ValueError(f"dense_features_from={name!r} must name a MaskCLIP teacher listed before this one")
        if other.mode != "whole":
            raise ValueError(f"dense_features_from={name!r}: that MaskCLIP teacher runs in {other.mode!r} mode; "
                             "only whole mode keeps one feature map per image")
        fields = ("model", "pretrained", "arch_config", "quick_gelu")
        differ = [f for f in fields if getattr(other, f) != getattr(self, f)]
        if differ:
            raise ValueError(
                f"dense_features_from={name!r}: the MaskCLIP teacher uses other CLIP weights "
                f"(differs in {differ}); pooled features would not match this embedder's model"
            )


# --------------------------------------------------------------------------
# Box geometry (pure functions, tested on their own)
# --------------------------------------------------------------------------


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """xyxy boxes clipped to ``[0, width] x [0, height]``."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def scale_boxes(boxes: torch.Tensor, factor: float, height: float, width: float) -> torch.Tensor:
    """Boxes grown (or shrunk) by ``factor`` about their centres, then clipped."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return clip_boxes(torch.cat([centre - half, centre + half], dim=1), height, width)


def central_square(boxes: torch.Tensor) -> torch.Tensor:
    """The centred square of side ``min(w, h)`` inside each box.

    Resizing a crop's shortest side to S and centre-cropping S x S (open_clip's
    evaluation transform) keeps exactly this part of the box.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amin(dim=1, keepdim=True)
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


def select_proposals(
    boxes: torch.Tensor, scores: torch.Tensor, iou: float, limit: int
) -> torch.Tensor:
    """Indices kept by class-agnostic NMS, best score first, at most ``limit``."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    keep = torch.arange(len(boxes)) if iou >= 1.0 else nms(boxes.float(), scores.float(), iou).sort().values
    # best score first; ties keep their input order, so outputs are reproducible
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    return keep[:limit]


def _meta_boxes(value: Any, box_format: str) -> tuple[list[list[float]], list[float]]:
    """Boxes and scores from a JSON proposals field.

    Accepts ``[[x1, y1, x2, y2], ...]``, ``[[x1, y1, x2, y2, score], ...]``
    or ``[{"bbox": [...], "score": s}, ...]``; ``box_format`` says whether
    the four numbers are xyxy or COCO xywh.
    """
    if not isinstance(value, list):
        raise ValueError(f"expected a list of boxes, got {type(value).__name__}")
    boxes, scores = [], []
    for item in value:
        if isinstance(item, dict):
            coords, score = item.get("bbox", item.get("box")), item.get("score", 1.0)
        else:
            coords, score = item, 1.0
            if isinstance(item, (list, tuple)) and len(item) == 5:
                coords, score = item[:4], item[4]
        if not isinstance(coords, (list, tuple)) or len(coords) != 4:
            raise ValueError(f"a proposal must have 4 coordinates, got {coords!r}")
        x1, y1, a, b = (float(v) for v in coords)
        boxes.append([x1, y1, x1 + a, y1 + b] if box_format == "xywh" else [x1, y1, a, b])
        scores.append(float(score))
    return boxes, scores


# --------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------


class ViLDEmbedder(CLIPTeacher):
    """Writes CLIP embeddings of each image's proposals (no labels)."""

    Config = ViLDConfig
    type_name = "vild"

    def __init__(self, config: ViLDConfig, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        self.embed_dim = int(self.clip.visual.output_dim)
        self.model_name = self.clip_arch_name()
        size = self.preprocess_cfg.get("size", (224, 224))
        self.crop_size = config.crop_size or int(size[0] if isinstance(size, (tuple, list)) else size)
        self.dense = DenseCLIP(self.clip).to(device) if config.mode == "dense" else None

    # ------------------------------------------------------------ proposals
    def proposals(
        self, batch: ImageBatch, upstream: dict[str, list[TeacherOutput | None]]
    ) -> list["Proposals"]:
        """Per image: kept boxes (N, 4) xyxy in original pixels, scores, sources."""
        cfg = self.config
        out = []
        for i in range(len(batch)):
            h, w = batch.orig_hw[i]
            boxes: list[list[float]] = []
            scores: list[float] = []
            sources: list[str] = []
            for src in cfg.proposals:
                if src.teacher is not None:
                    got = upstream.get(src.teacher, [None] * len(batch))[i]
                    if got is None:  # that teacher failed or skipped this image
                        continue
                    b = [[x, y, x + bw, y + bh] for x, y, bw, bh in (lab.bbox for lab in got.labels)]
                    s = [float(lab.score) for lab in got.labels]
                else:
                    value = batch.metas[i].get(src.meta_field)
                    if value is None:
                        continue
                    try:
                        b, s = _meta_boxes(value, src.box_format)
                    except (TypeError, ValueError) as exc:
                        raise ValueError(f"{batch.keys[i]}: json field {src.meta_field!r}: {exc}") from None
                keep = [j for j, sc in enumerate(s) if sc >= src.min_score]
                boxes += [b[j] for j in keep]
                scores += [s[j] for j in keep]
                sources += [src.label] * len(keep)
            if cfg.whole_image:
                boxes.append([0.0, 0.0, float(w), float(h)])
                scores.append(1.0)
                sources.append(WHOLE_IMAGE)
            bt = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            st = torch.tensor(scores, dtype=torch.float32)
            if not torch.isfinite(bt).all() or not torch.isfinite(st).all():
                raise ValueError(f"{batch.keys[i]}: proposals contain NaN or infinite values")
            bt = clip_boxes(bt, h, w)
            size_ok = ((bt[:, 2] - bt[:, 0]) >= max(cfg.min_box_size, 1e-3)) & (
                (bt[:, 3] - bt[:, 1]) >= max(cfg.min_box_size, 1e-3)
            )
            idx = size_ok.nonzero().flatten()
            keep = idx[select_proposals(bt[idx], st[idx], cfg.nms_iou, cfg.max_regions)]
            out.append(Proposals(bt[keep], st[keep], [sources[int(j)] for j in keep], len(bt) - len(idx)))
        return out

    # ----------------------------------------------------------------- crop
    def crop_boxes(self, boxes: torch.Tensor, height: float, width: float, scale: float) -> torch.Tensor:
        """The part of the image (original pixels) that one crop of each box shows."""
        grown = scale_boxes(boxes, scale, height, width)
        return central_square(grown) if self.config.crop_resize == "center_crop" else grown

    def cut_crops(self, image: torch.Tensor, crop_boxes_work: torch.Tensor) -> torch.Tensor:
        """RoIAlign crops (K, 3, S, S) in 0..255 of a uint8 (H, W, 3) image; boxes in its pixels."""
        x = image.permute(2, 0, 1)[None].float()
        return roi_align(
            x, [crop_boxes_work.to(x.device, x.dtype)], output_size=(self.crop_size, self.crop_size),
            spatial_scale=1.0, sampling_ratio=-1, aligned=True,
        )

    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP embeddings (K, D) of crops in 0..255."""
        x = (crops / 255 - self.mean) / self.std
        with self.autocast():
            emb = self.clip.encode_image(x)
        return F.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def crop_embeddings(self, batch: ImageBatch, props) -> list[torch.Tensor]:
        """Crop-mode embeddings, one (N_i, D) tensor per image, crops batched across images."""
        cfg = self.config
        jobs: list[tuple[int, int, int]] = []  # (image, scale index, region)
        plans: list[list[torch.Tensor]] = []  # per image, per scale: crop boxes in work pixels
        for i, (boxes, *_) in enumerate(props):
            h, w = batch.orig_hw[i]
            wh, ww = batch.work_hw[i]
            to_work = torch.tensor([ww / w, wh / h, ww / w, wh / h])
            plans.append([self.crop_boxes(boxes, h, w, s) * to_work for s in cfg.crop_scales])
            jobs += [(i, k, r) for k in range(len(cfg.crop_scales)) for r in range(len(boxes))]
        sums = [torch.zeros(len(p.boxes), self.embed_dim) for p in props]
        for start in range(0, len(jobs), cfg.crop_batch_size):
            chunk = jobs[start : start + cfg.crop_batch_size]
            crops = []
            for (i, k), group in _groups(chunk):
                rows = torch.tensor([r for _, _, r in group])
                crops.append(self.cut_crops(batch.image(i), plans[i][k][rows]))
            emb = self.encode_crops(torch.cat(crops)).cpu()
            for (i, k, r), e in zip(chunk, emb):
                sums[i][r] += e
        return [F.normalize(s, dim=-1) for s in sums]

    # ---------------------------------------------------------------- dense
    @torch.inference_mode()
    def dense_maps(self, batch: ImageBatch) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        """Own dense forward: (D, gh, gw) value-path features and the extent the image covers.

        Images are resized exactly as MaskCLIP's whole mode does (short side
        ``dense_image_size``, long side at most ``dense_max_long_side``,
        padded to a patch multiple), with the same helper.
        """
        assert self.dense is not None
        cfg = self.config
        p = int(self.dense.patch_size[0])
        inputs, extents = [], []
        for i in range(len(batch)):
            h, w = batch.orig_hw[i]
            rh, rw = fit_size(h, w, cfg.dense_image_size, cfg.dense_max_long_side)
            inputs.append(vit_input(batch.image(i), (rh, rw), self.mean, self.std, p))
            extents.append((rh / p, rw / p))
        with self.autocast():
            dense = self.dense.forward_list(inputs)
        return [(df.features[0].float(), ext) for df, ext in zip(dense, extents)]

    def _upstream_maps(self, batch: ImageBatch, upstream) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        name = self.config.dense_features_from
        outs = upstream.get(name)
        if outs is None:
            raise RuntimeError(f"dense_features_from={name!r}: that teacher produced nothing for this batch")
        maps = []
        for i, out in enumerate(outs):
            sm = None if out is None else out.extras.get("score_map")
            if sm is None or sm.features is None:
                raise RuntimeError(f"{batch.keys[i]}: teacher {name!r} left no dense features for this image")
            if sm.weights_id != self.weights_id:
                raise RuntimeError(
                    f"dense_features_from={name!r} computed its features with {sm.weights_id}, "
                    f"this embedder has {self.weights_id}"
                )
            maps.append((sm.features, sm.extent))
        return maps

    @torch.inference_mode()
    def dense_embeddings(self, batch: ImageBatch, props, upstream) -> list[torch.Tensor]:
        if self.config.dense_features_from is not None:
            maps = self._upstream_maps(batch, upstream)
        else:
            maps = self.dense_maps(batch)
        out = []
        for i, ((boxes, *_), (feats, extent)) in enumerate(zip(props, maps)):
            h, w = batch.orig_hw[i]
            out.append(pool_regions(feats, extent, (h, w), boxes, self.config.dense_roi_size).cpu())
        return out

    def pixel_scale(self, batch: ImageBatch, i: int, upstream) -> float:
        """Pixels the encoder saw per original pixel for image ``i`` (recorded on every row).

        crop mode: the decoded copy the crops were cut from (1.0 when the
        photo is within ``work_short_side`` / ``work_max_long_side`` or when
        those are null); dense mode: the resolution the dense forward ran at.
        """
        h, w = batch.orig_hw[i]
        if self.config.mode == "crop":
            wh, ww = batch.work_hw[i]
            return float(min(wh / max(h, 1), ww / max(w, 1)))
        if self.config.dense_features_from is not None:
            rh, rw = upstream[self.config.dense_features_from][i].extras["score_map"].work_hw
        else:
            rh, rw = fit_size(h, w, self.config.dense_image_size, self.config.dense_max_long_side)
        return float(min(rh / max(h, 1), rw / max(w, 1)))

    # -------------------------------------------------------------- predict
    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        props = self.proposals(batch, upstream)
        if self.config.mode == "crop":
            embs = self.crop_embeddings(batch, props)
        else:
            embs = self.dense_embeddings(batch, props, upstream)
        outs = []
        for i, ((boxes, scores, sources, dropped), emb) in enumerate(zip(props, embs)):
            regions = RegionSet(
                boxes=boxes.numpy().astype(np.float32),
                scores=scores.numpy().astype(np.float32),
                sources=sources,
                embeddings=emb.numpy().astype(np.float16).reshape(len(boxes), self.embed_dim),
                mode=self.config.mode,
                model=self.model_name,
                pixel_scale=self.pixel_scale(batch, i, upstream),
            )
            warnings = []
            if dropped:
                warnings.append(f"{self.name}: {dropped} proposal(s) empty or thinner than min_box_size="
                                f"{self.config.min_box_size} px after clipping to the image, dropped")
            outs.append(TeacherOutput(regions=regions, warnings=warnings))
        return outs


def pool_regions(
    features: torch.Tensor, extent: tuple[float, float], orig_hw: tuple[int, int], boxes: torch.Tensor, bins: int
) -> torch.Tensor:
    """Normalised region embeddings (N, D) averaged by RoIAlign from a (D, Gh, Gw) map.

    Grid cell ``(r, c)`` covers ``[c, c+1] x [r, r+1]`` in grid units, and the
    image spans ``extent`` cells from the top-left corner, so an original
    pixel coordinate ``x`` sits at ``x * extent[1] / W`` on the grid.
    """
    d = features.shape[0]
    if len(boxes) == 0:
        return torch.zeros(0, d)
    h, w = orig_hw
    to_grid = torch.tensor([extent[1] / w, extent[0] / h, extent[1] / w, extent[0] / h])
    gboxes = (boxes.float() * to_grid).to(features.device)
    pooled = roi_align(features[None].float(), [gboxes], output_size=(bins, bins), spatial_scale=1.0,
                       sampling_ratio=2, aligned=True)
    return F.normalize(pooled.mean(dim=(2, 3)), dim=-1)


def _groups(chunk: list[tuple[int, int, int]]):
    """Consecutive runs of jobs with the same (image, scale)."""
    start = 0
    for j in range(1, len(chunk) + 1):
        if j == len(chunk) or chunk[j][:2] != chunk[start][:2]:
            yield chunk[start][:2], chunk[start:j]
            start = j
