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

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from labelmill.models.openclip import DenseCLIP, fit_size, vit_input
from labelmill.models.transfer import HostCopy
from labelmill.schemas.raw import RawBatch
from labelmill.schemas.records import TeacherOutput
from labelmill.teachers.base import ImageBatch, Pending
from labelmill.teachers.configs import ORIGINAL, WHOLE_IMAGE, ViLDConfig  # noqa: F401  (ORIGINAL: re-exported)
from labelmill.teachers.maskclip import CLIPTeacher


class Proposals(NamedTuple):
    """The regions one image will embed, after clipping, NMS and the cap."""

    boxes: torch.Tensor      # (N, 4) xyxy, original pixels
    scores: torch.Tensor     # (N,)
    sources: list[str]
    dropped: int             # proposals discarded as empty or too thin


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
                    found_boxes, found_scores = got.proposal_boxes()  # TeacherOutput or a split teacher's view
                    b, s = found_boxes.tolist(), found_scores.tolist()
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
        """Crop-mode embeddings, one (N_i, D) tensor per image on the device, crops batched across images."""
        cfg = self.config
        jobs: list[tuple[int, int, int]] = []  # (image, scale index, region)
        plans: list[list[torch.Tensor]] = []  # per image, per scale: crop boxes in work pixels
        for i, (boxes, *_) in enumerate(props):
            h, w = batch.orig_hw[i]
            wh, ww = batch.work_hw[i]
            to_work = torch.tensor([ww / w, wh / h, ww / w, wh / h])
            plans.append([self.crop_boxes(boxes, h, w, s) * to_work for s in cfg.crop_scales])
            jobs += [(i, k, r) for k in range(len(cfg.crop_scales)) for r in range(len(boxes))]
        first = np.cumsum([0] + [len(p.boxes) for p in props])
        sums = torch.zeros(int(first[-1]), self.embed_dim, device=self.device)
        for start in range(0, len(jobs), cfg.crop_batch_size):
            chunk = jobs[start : start + cfg.crop_batch_size]
            crops = []
            for (i, k), group in _groups(chunk):
                rows = torch.tensor([r for _, _, r in group])
                crops.append(self.cut_crops(batch.image(i), plans[i][k][rows]))
            rows = torch.tensor([int(first[i]) + r for i, _, r in chunk], device=self.device)
            sums.index_add_(0, rows, self.encode_crops(torch.cat(crops)).to(sums.device))
        sums = F.normalize(sums, dim=-1)
        return [sums[first[i] : first[i + 1]] for i in range(len(props))]

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
            out.append(pool_regions(feats, extent, (h, w), boxes, self.config.dense_roi_size))
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
        return self.predict_split(batch, upstream)

    def infer_async(self, batch: ImageBatch, upstream, prepared) -> Pending:
        """Proposals, embeddings on the device and their one copy back; the :class:`Pending` gives the raw
        regions (:class:`~labelmill.teachers.hosts.ViLDHost` makes the region rows)."""
        props = self.proposals(batch, upstream)
        if self.config.mode == "crop":
            embs = self.crop_embeddings(batch, props)
        else:
            embs = self.dense_embeddings(batch, props, upstream)
        n = len(batch)
        index = {label: k for k, label in reversed(list(enumerate(self.host.source_labels())))}
        counts = [len(p.boxes) for p in props]
        emb = torch.cat(embs) if embs else torch.zeros(0, self.embed_dim)
        copy = HostCopy(emb.to(torch.float16).reshape(-1))
        arrays = {
            "boxes": np.concatenate([p.boxes.numpy().astype(np.float32).reshape(-1, 4) for p in props])
            if props else np.zeros((0, 4), np.float32),
            "scores": np.concatenate([p.scores.numpy().astype(np.float32) for p in props])
            if props else np.zeros(0, np.float32),
            "sources": np.array([index[s] for p in props for s in p.sources], np.int64),
            "pixel_scale": np.array([self.pixel_scale(batch, i, upstream) for i in range(n)], np.float64),
            "dropped": np.array([p.dropped for p in props], np.int64),
            "dim": np.full(n, self.embed_dim, np.int64),
        }
        ones = np.ones(n, np.int64)

        def finish() -> RawBatch:
            return RawBatch.from_counts({**arrays, "embeddings": copy.get().numpy()},
                                        {"boxes": counts, "scores": counts, "sources": counts, "pixel_scale": ones,
                                         "embeddings": np.asarray(counts, np.int64) * self.embed_dim,
                                         "dropped": ones, "dim": ones})

        return Pending(finish)


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
