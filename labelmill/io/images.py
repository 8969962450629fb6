"""Image decoding that never surprises: every odd file becomes RGB or a reason.

Handled: JPEG (with DCT-domain downscaling when the target is small), PNG,
WebP, GIF/BMP/TIFF; greyscale, palette, CMYK, 16-bit and float images;
alpha (composited over white); EXIF orientation; and a pixel-count guard
against decompression bombs that is checked from the header, before any
pixel is decoded.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelmill.schemas.records import ImageRequest

_ROTATING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason."""


@dataclass
class DecodedImage:
    pixels: np.ndarray                 # (h, w, 3) uint8, the working-size image
    orig_hw: tuple[int, int]           # original size after EXIF rotation
    warnings: list[str] = field(default_factory=list)



def scaled_side(n: int, scale: float) -> int:
    """A side after scaling, rounded half up like the teachers' own resize (``models.openclip.fit_size``,
    mmcv's ``rescale_size``): Python's ``round`` rounds half to even, which gave some images a size one
    pixel off the teacher's and so an extra 1-px resize."""
    return max(1, int(n * scale + 0.5))

def short_side_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the short side ``min_size`` unless the long side would pass ``max_size`` (then the long
    side is ``max_size``): maskrcnn-benchmark's Resize.get_size, GLIP's rule in training and inference."""
    size = min_size
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            top = 1.0 if float(np.nanmax(arr, initial=0)) <= 1.0 else 255.0
            arr = np.nan_to_num(arr) * (255.0 / top)
        elif arr.dtype != np.uint8 and int(arr.max(initial=0)) > 255:
            arr = arr.astype(np.float64) / 257.0
        notes.append(f"{mode} image scaled to 8 bits")
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("alpha composited over white")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        # every conversion is noted (the README's bad-input table promises it)
        what = {"L": "greyscale", "1": "1-bit", "P": "palette"}.get(mode, mode)
        notes.append(f"{what} converted to RGB")
        return img.convert("RGB")
    return img


_PIL_LIMIT_LOCK = threading.Lock()


def _open_header(data: bytes) -> Image.Image:
    """``Image.open`` (reads the header only) with PIL's own pixel limit off.

    labelmill checks the size from the header itself, with
    ``input.max_image_pixels`` and its own message; PIL's limit would
    otherwise fire first (with another number and message) and refuse images
    below a raised labelmill limit.  PIL reads its limit at open time, so it
    is lifted for the open only, under a lock.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes | None, request: ImageRequest, max_pixels: int) -> DecodedImage:
    """Decode ``data`` to RGB at the resolution ``request`` asks for (never enlarged)."""
    if not data:
        raise ImageDecodeError("empty image file (0 bytes)")
    try:
        img = _open_header(data)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"undecodable image: not a recognised format ({len(data)} bytes)") from None
    except Exception as exc:
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from None

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels} "
            "(decompression-bomb guard, input.max_image_pixels)"
        )
    notes: list[str] = []
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception as exc:  # a broken EXIF block must not cost the image
        orientation = 1
        notes.append(f"unreadable EXIF ignored ({type(exc).__name__}: {exc})")
    rotated = orientation in _ROTATING_ORIENTATIONS
    orig_h, orig_w = (width, height) if rotated else (height, width)
    scale = min(1.0, request.scale_for(orig_h, orig_w))

    try:
        if img.format == "JPEG" and scale < 1.0:
            # decode straight at a reduced size (1/2, 1/4, 1/8) when the target allows
            draft_mode = "RGB" if img.mode in ("RGB", "YCbCr") else img.mode
            img.draft(draft_mode, (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
        img = _to_rgb(img, notes)
    except ImageDecodeError:
        raise
    except Exception as exc:  # truncated data, corrupt stream
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from None

    target = (scaled_side(orig_w, scale), scaled_side(orig_h, scale))
    if img.size != target:
        img = img.resize(target, Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"decoder produced an array of shape {pixels.shape}")
    return DecodedImage(pixels=pixels, orig_hw=(orig_h, orig_w), warnings=notes)


def decode_caption(data: bytes | None) -> tuple[str | None, list[str]]:
    """Caption text and warnings.  Invalid UTF-8 is kept with replacement characters."""
    if data is None:
        return None, ["missing caption"]
    try:
        return data.decode("utf-8").strip(), []
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace").strip()
        return text, [f"caption is not valid UTF-8 (byte {exc.start}); undecodable bytes replaced by U+FFFD"]


# --------------------------------------------------------------------------
# Batched decode on a CUDA device (nvJPEG through torchvision)
# --------------------------------------------------------------------------

_NVJPEG_MODES = ("RGB", "L")


def nvjpeg_target(data: bytes, request: ImageRequest, max_pixels: int) -> tuple[int, int, int, int] | None:
    """(orig_h, orig_w, work_h, work_w) if nvJPEG can decode ``data`` to what :func:`decode_image`
    would give; None when the image needs the CPU path (not a baseline RGB/grey JPEG, EXIF
    rotation, too large, unreadable header: the CPU path then reports the reason)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in _NVJPEG_MODES or img.info.get("progressive"):
            return None
        width, height = img.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            return None
        if int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1) != 1:
            return None
    except Exception:  # not nvJPEG's to judge: the PIL path decodes it or reports the error row
        return None
    scale = min(1.0, request.scale_for(height, width))
    return height, width, scaled_side(height, scale), scaled_side(width, scale)


def decode_batch(
    blobs: list[bytes | None], request: ImageRequest, max_pixels: int, device
) -> list[DecodedImage | ImageDecodeError]:
    """Decode many images at once: (h, w, 3) uint8 pixels, tensors on a CUDA ``device``,
    numpy arrays (exactly :func:`decode_image`'s) on CPU.

    On CUDA, the JPEGs :func:`nvjpeg_target` accepts are decoded in one
    batched ``torchvision.io.decode_jpeg(device="cuda")`` call and resized on
    the GPU (bilinear, antialiased: close to, not bit-equal with, PIL's
    draft + bilinear resize); every other image takes :func:`decode_image`
    and is copied to the device.  On CPU every image takes
    :func:`decode_image`, so pixels equal the decode tasks' exactly.
    """
    import torch

    device = torch.device(device)
    out: list[DecodedImage | ImageDecodeError | None] = [None] * len(blobs)
    gpu_idx, targets = [], []
    if device.type == "cuda":
        for i, data in enumerate(blobs):
            target = nvjpeg_target(data, request, max_pixels) if data else None
            if target is not None:
                gpu_idx.append(i)
                targets.append(target)
    if gpu_idx:
        decoded = _nvjpeg(blobs, gpu_idx, device)
        for i, target, pixels in zip(gpu_idx, targets, decoded):
            if pixels is None:
                continue  # nvJPEG refused it: the CPU path decides
            out[i] = DecodedImage(pixels=_resize_chw(pixels, target[2], target[3]), orig_hw=(target[0], target[1]))
    for i, data in enumerate(blobs):
        if out[i] is not None:
            continue
        try:
            got = decode_image(data, request, max_pixels)
        except ImageDecodeError as exc:
            out[i] = exc
            continue
        if device.type == "cuda":
            got.pixels = torch.from_numpy(np.array(got.pixels)).to(device)
        out[i] = got
    return out  # type: ignore[return-value]


def _nvjpeg(blobs, idx: list[int], device) -> list:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in idx]
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad file fails the batched call: retry one by one
        pass
    out = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except Exception:  # None sends this image to the PIL path, which decodes it or gives its error row
            out.append(None)
    return out


def _resize_chw(pixels, height: int, width: int):
    """(3, H, W) uint8 -> (height, width, 3) uint8, bilinear with antialiasing."""
    import torch
    import torch.nn.functional as F

    if tuple(pixels.shape[1:]) != (height, width):
        resized = F.interpolate(
            pixels[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )[0]
        pixels = resized.round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous()
