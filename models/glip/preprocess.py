"""Image preprocessing matching GLIP's test-time transform.

RGB uint8 ``(H, W, 3)`` -> resized with PIL bilinear so the short side is
``min_size`` unless that pushes the long side past ``max_size`` (then the
long side is ``max_size``; GLIP's ``Resize.get_size`` arithmetic, including
its rounding) -> channels reversed to BGR, kept in 0..255 -> normalised with
GLIP's per-channel mean/std -> zero-padded at the bottom/right to a multiple
of 32 (or to a chosen canvas size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from labelmill.io.images import short_side_size


@dataclass
class PreparedImage:
    """A normalised, resized (not yet padded) image and how to undo the resize."""

    tensor: torch.Tensor  # (3, h, w) float32, BGR, normalised
    orig_size: tuple[int, int]  # (H, W) of the input
    resized_size: tuple[int, int]  # (h, w) after resizing

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): multiply model-space x / y coordinates by these for original pixels."""
        return self.orig_size[1] / self.resized_size[1], self.orig_size[0] / self.resized_size[0]


#: (h, w) after GLIP's resize rule for a (height, width) image (shared with training, which has no torch)
target_size = short_side_size


def _as_uint8_rgb(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return np.ascontiguousarray(image)


def prepare_image(
    image,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    min_size: int,
    max_size: int | None,
) -> PreparedImage:
    """Resize and normalise one RGB uint8 image (numpy array or CPU/GPU tensor)."""
    rgb = _as_uint8_rgb(image)
    height, width = rgb.shape[:2]
    h, w = target_size(height, width, min_size, max_size)
    if (h, w) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    bgr = torch.from_numpy(rgb[:, :, ::-1].astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(pixel_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(pixel_std, dtype=torch.float32)[:, None, None]
    return PreparedImage(((bgr - mean) / std).contiguous(), (height, width), (h, w))


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
    if divisibility <= 0:
        return height, width
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def choose_canvas(height: int, width: int, canvases: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Smallest-area canvas (H, W) that contains an image of the given size."""
    fitting = [c for c in canvases if c[0] >= height and c[1] >= width]
    if not fitting:
        raise ValueError(f"no canvas among {list(canvases)} holds a {height}x{width} image")
    return min(fitting, key=lambda c: (c[0] * c[1], c))


def pad_to(images: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Stack (3, h, w) tensors into (B, 3, H, W), zero-filling the bottom/right."""
    out = images[0].new_zeros((len(images), images[0].shape[0], size[0], size[1]))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    return out


def prepare_image_device(
    image: torch.Tensor,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    min_size: int,
    max_size: int | None,
) -> PreparedImage:
    """:func:`prepare_image` from a uint8 (H, W, 3) tensor, on that tensor's device (no host round trip).

    The resize is torch's antialiased bilinear (``F.interpolate(..., antialias=True)``), rounded to
    uint8 values as PIL's output is. It differs from PIL's bilinear filter by rounding: most pixels
    are equal, the rest 1 apart (0..255 scale) -- measured on coco128 in ``tests/test_glip_preprocess``.
    An image already at GLIP's size is not resampled by either path, so both give the same tensor.
    """
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image tensor, got {tuple(image.shape)} {image.dtype}")
    height, width = int(image.shape[0]), int(image.shape[1])
    h, w = target_size(height, width, min_size, max_size)
    x = image.permute(2, 0, 1).float()
    if (h, w) != (height, width):
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round_().clamp_(0, 255)
    x = x.flip(0)  # RGB -> BGR
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(pixel_std, dtype=torch.float32, device=x.device)[:, None, None]
    return PreparedImage(((x - mean) / std).contiguous(), (height, width), (h, w))
