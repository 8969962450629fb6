"""Joint augmentation: image and target move together (random scale, crop, flip; MaskCLIP+'s presets add
mmseg's resize rule, photometric distortion, a crop that no single class dominates and mean-colour padding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from labelmill.io.images import short_side_size
from labelmill.training.targets import IGNORE


@dataclass
class Augment:
    crop: int                               # output side (square)
    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range, relative to fitting the crop
    hflip: bool = True
    enabled: bool = True
    img_scale: tuple[int, int] | None = None  # (long, short): mmseg's rule, long <= long*r, short <= short*r
    photometric: bool = False                # mmseg's PhotoMetricDistortion
    pad_value: tuple[int, int, int] = (0, 0, 0)  # RGB the image is padded with (the mean colour: 0 after normalising)
    cat_max_ratio: float | None = None       # retry a crop (up to 10 times) where one class covers more than this

    def _scale(self, rng: np.random.Generator, h: int, w: int) -> float:
        r = float(rng.uniform(*self.scale)) if self.enabled else 1.0
        if self.img_scale is not None:
            long, short = self.img_scale
            return r * min(long / max(h, w), short / min(h, w))
        return r * self.crop / max(h, w)  # fit the long side into the crop

    def _seg_window(self, rng, tgt: np.ndarray) -> tuple[int, int]:
        nh, nw = tgt.shape
        y0, x0 = self._window(rng, nh, nw)
        if self.cat_max_ratio is None or not self.enabled:
            return y0, x0
        for _ in range(10):  # mmseg's RandomCrop: no single class above cat_max_ratio of the labelled crop
            crop = tgt[y0 : y0 + self.crop, x0 : x0 + self.crop]
            _, counts = np.unique(crop[crop != IGNORE], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
            y0, x0 = self._window(rng, nh, nw)
        return y0, x0

    def _window(self, rng, h: int, w: int) -> tuple[int, int]:
        if not self.enabled:
            return 0, 0
        return int(rng.integers(0, max(h - self.crop, 0) + 1)), int(rng.integers(0, max(w - self.crop, 0) + 1))

    def segmentation(self, image: np.ndarray, target: np.ndarray, rng: np.random.Generator):
        """(H, W, 3) uint8 + (H, W) ids -> (crop, crop, 3) uint8 + (crop, crop) int64, padded with IGNORE."""
        h, w = target.shape
        s = self._scale(rng, h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
        tgt = target[rows][:, cols]
        y0, x0 = self._seg_window(rng, tgt)
        img, tgt = img[y0 : y0 + self.crop, x0 : x0 + self.crop], tgt[y0 : y0 + self.crop, x0 : x0 + self.crop]
        if self.enabled and self.hflip and rng.random() < 0.5:
            img, tgt = img[:, ::-1], tgt[:, ::-1]
        if self.enabled and self.photometric:
            img = photometric_distortion(img, rng)
        out_img = np.empty((self.crop, self.crop, 3), np.uint8)
        out_img[:] = np.asarray(self.pad_value, np.uint8)
        out_tgt = np.full((self.crop, self.crop), IGNORE, np.int64)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_tgt[: tgt.shape[0], : tgt.shape[1]] = tgt
        return out_img, out_tgt

    def boxes(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, min_side: float = 2.0):
        """(H, W, 3) + (N, 4) xyxy -> (crop, crop, 3) + (M, 4) + kept indices (boxes cut to < min_side drop);
        the crop is padded with ``pad_value``."""
        h, w = image.shape[:2]
        s = self._scale(rng, h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        b = boxes.astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        y0, x0 = self._window(rng, nh, nw)
        img = img[y0 : y0 + self.crop, x0 : x0 + self.crop]
        b = b - np.array([x0, y0, x0, y0], np.float32)
        ch, cw = img.shape[:2]
        # inclusive pixel corners (GLIP's convention): the last column is cw - 1, a flip maps x to cw - 1 - x
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, cw - 1)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, ch - 1)
        if self.enabled and self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            b = np.stack([cw - 1 - b[:, 2], b[:, 1], cw - 1 - b[:, 0], b[:, 3]], 1)
        keep = np.nonzero(((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side))[0]
        out = np.empty((self.crop, self.crop, 3), np.uint8)
        out[:] = np.asarray(self.pad_value, np.uint8)
        out[:ch, :cw] = img
        return out, b[keep], keep

    def boxes_resized(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                      min_sizes: tuple[int, ...], max_size: int):
        """GLIP's training transform: the short side resized to one of ``min_sizes`` (drawn; the largest
        without augmentation) with the long side at most ``max_size``, a horizontal flip, no crop.  Boxes are
        xyxy with inclusive pixel corners (GLIP's convention), so the flip maps x to ``width - 1 - x``.
        Returns the (h, w, 3) image (unpadded: the trainer pads a batch with the mean colour, as inference
        does) and the boxes; none is dropped."""
        h, w = image.shape[:2]
        short = int(rng.choice(min_sizes)) if self.enabled else int(max(min_sizes))
        nh, nw = short_side_size(h, w, short, max_size)
        img = image if (nh, nw) == (h, w) else np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        b = boxes.astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        if self.enabled and self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            b = np.stack([nw - 1 - b[:, 2], b[:, 1], nw - 1 - b[:, 0], b[:, 3]], 1)
        return np.ascontiguousarray(img), b



def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: each step with probability 1/2, brightness (+-32), contrast
    (x 0.5..1.5) before or after saturation (x 0.5..1.5) and hue (+-18 of 180 degrees), clipped to 0..255."""
    out = img.astype(np.float32)
    if rng.integers(2):
        out = out + float(rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))

    def contrast(x):
        return x * float(rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if contrast_first:
        out = contrast(out)
    hsv = np.asarray(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
    if rng.integers(2):
        hsv[..., 1] = hsv[..., 1] * float(rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + float(rng.uniform(-18, 18)) * 256 / 180) % 256
    out = np.asarray(Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        out = contrast(out)
    return np.clip(out, 0, 255).astype(np.uint8)
