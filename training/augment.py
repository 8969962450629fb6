"""Joint augmentation: image and target move together (random scale, crop, flip)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from labelmill.training.targets import IGNORE


@dataclass
class Augment:
    crop: int                               # output side (square)
    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range, relative to fitting the crop
    hflip: bool = True
    enabled: bool = True

    def _scale(self, rng: np.random.Generator, h: int, w: int) -> float:
        base = self.crop / max(h, w)  # fit the long side into the crop
        if not self.enabled:
            return base
        return base * float(rng.uniform(*self.scale))

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
        y0, x0 = self._window(rng, nh, nw)
        img, tgt = img[y0 : y0 + self.crop, x0 : x0 + self.crop], tgt[y0 : y0 + self.crop, x0 : x0 + self.crop]
        if self.enabled and self.hflip and rng.random() < 0.5:
            img, tgt = img[:, ::-1], tgt[:, ::-1]
        out_img = np.zeros((self.crop, self.crop, 3), np.uint8)
        out_tgt = np.full((self.crop, self.crop), IGNORE, np.int64)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_tgt[: tgt.shape[0], : tgt.shape[1]] = tgt
        return out_img, out_tgt

    def boxes(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, min_side: float = 2.0):
        """(H, W, 3) + (N, 4) xyxy -> (crop, crop, 3) + (M, 4) + kept indices (boxes cut to < min_side drop)."""
        h, w = image.shape[:2]
        s = self._scale(rng, h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        b = boxes.astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        y0, x0 = self._window(rng, nh, nw)
        img = img[y0 : y0 + self.crop, x0 : x0 + self.crop]
        b = b - np.array([x0, y0, x0, y0], np.float32)
        ch, cw = img.shape[:2]
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, cw)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, ch)
        if self.enabled and self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            b = np.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], 1)
        keep = np.nonzero(((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side))[0]
        out = np.zeros((self.crop, self.crop, 3), np.uint8)
        out[:ch, :cw] = img
        return out, b[keep], keep
