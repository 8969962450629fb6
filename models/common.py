"""Helpers shared by the networks and the teachers that wrap them.

``models/`` imports nothing from ``teachers/``: the error type for missing
weights, file hashing and the precision setting live here, and
``labelmill.teachers.base`` re-exports them for plug-in authors. Importing
this module does not import torch (config validation and the CPU pools use it).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class WeightsError(RuntimeError):
    """Weights (or a tokenizer) a teacher needs are missing or unusable."""


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype a teacher's ``precision`` setting asks for (None = fp32).

    ``auto`` is fp32 on CPU and bf16 on CUDA (fp16 where the GPU has no bf16).
    """
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
