"""Loading official GLIP checkpoints into :class:`~labelmill.models.glip.model.GLIP`.

The released files (``glip_tiny_model_o365_goldg.pth``,
``glip_tiny_model_o365_goldg_cc_sbu.pth``) hold ``{"model": state_dict}``
written from a ``DistributedDataParallel`` wrapper, so every key starts with
``module.``.  Our module tree reproduces the official names, so the only
mapping is that prefix: :func:`to_model_key` strips it and
:func:`to_checkpoint_key` adds it back (round trip in both directions).

Buffers: the checkpoint stores the Swin ``relative_position_index`` tables,
the five ATSS ``rpn.anchor_generator.cell_anchors.<i>`` and BERT's
``embeddings.position_ids`` (persistent in the transformers versions GLIP was
trained with).  All are deterministic; if a file lacks ``position_ids``
(e.g. one re-saved with a recent transformers) the model keeps its own copy
and the report says so.  BERT's all-zero ``embeddings.token_type_ids``
buffer (non-persistent in GLIP's era, persistent in some other versions) is
dropped if a file happens to contain it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from labelmill.models.common import WeightsError
from labelmill.models.safe_load import check_finite, read_tensors

DDP_PREFIX = "module."
# Keys the model may supply itself when a file does not have them.
REGENERABLE_KEYS = frozenset({"language_backbone.body.model.embeddings.position_ids"})
# Constant buffers that some transformers versions persist and GLIP-T's
# module tree does not keep; dropped (and reported) if a file has them.
IGNORABLE_KEYS = frozenset({"language_backbone.body.model.embeddings.token_type_ids"})

DOWNLOAD_HINT = (
    "GLIP-T weights are the official files 'glip_tiny_model_o365_goldg.pth' (O365+GoldG) or "
    "'glip_tiny_model_o365_goldg_cc_sbu.pth' (O365+GoldG+CC3M+SBU), published at "
    "https://huggingface.co/GLIPModel/GLIP, e.g. "
    "'wget https://huggingface.co/GLIPModel/GLIP/resolve/main/glip_tiny_model_o365_goldg.pth'. "
    "GLIP-L uses 'glip_large_model.pth' from the same place. A safetensors copy of the state dict "
    "(see save_glip_weights) is accepted too."
)


class CheckpointError(WeightsError):
    pass


def to_model_key(key: str) -> str:
    """Checkpoint key -> model key (drops one leading ``module.``)."""
    return key[len(DDP_PREFIX) :] if key.startswith(DDP_PREFIX) else key


def to_checkpoint_key(key: str, data_parallel: bool = True) -> str:
    """Model key -> key as written in the official files (adds ``module.``)."""
    return DDP_PREFIX + key if data_parallel and not key.startswith(DDP_PREFIX) else key


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    regenerated: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a GLIP ``.pth`` (``{"model": ...}`` or a bare state dict), ``.safetensors`` or ``.npz`` file.

    Read by :func:`labelmill.models.safe_load.read_tensors`: nothing from the
    file runs; a pickle that needs more than tensors is refused, naming
    ``labelmill convert-weights``. NaN or infinite weights are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLIP checkpoint not found: {path}. {DOWNLOAD_HINT}")
    try:
        state = read_tensors(path)
        check_finite(state, path)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    if not state:
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


#: buffers computed from the architecture alone; a checkpoint's copy must equal the formula
DETERMINISTIC_SUFFIXES = ("relative_position_index", "embeddings.position_ids")
DETERMINISTIC_PREFIXES = ("rpn.anchor_generator.cell_anchors.",)
#: anchors are float boxes on a half-pixel lattice; the tolerance absorbs float32 rounding only
ANCHOR_ATOL = 1e-3


def _check_values(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """dtypes must match the model's; deterministic buffers must equal their formulas."""
    kinds = []
    for k, v in state.items():
        if k not in own:
            continue
        mine = own[k]
        if v.is_floating_point() != mine.is_floating_point() or (v.dtype == torch.bool) != (mine.dtype == torch.bool):
            kinds.append(f"{k}: file {str(v.dtype).replace('torch.', '')} vs model "
                         f"{str(mine.dtype).replace('torch.', '')}")
    if kinds:
        raise CheckpointError(
            "dtype mismatch (not a GLIP checkpoint, or a corrupted one):\n  " + "\n  ".join(kinds[:20])
        )
    wrong = []
    for k, v in state.items():
        if k not in own or not (k.endswith(DETERMINISTIC_SUFFIXES) or k.startswith(DETERMINISTIC_PREFIXES)):
            continue
        mine = own[k]
        same = (torch.equal(v.to(mine.dtype), mine) if not mine.is_floating_point()
                else torch.allclose(v.float(), mine.float(), atol=ANCHOR_ATOL, rtol=0))
        if not same:
            wrong.append(k)
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} buffer(s) that follow from the architecture differ from their formulas "
            f"(relative position indices, anchors, position ids): {wrong[:10]}. The file is not a GLIP "
            "checkpoint of this architecture, or it is corrupted."
        )


def load_glip_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
) -> LoadReport:
    """Load an official GLIP checkpoint (or one saved by :func:`save_glip_weights`).

    With ``strict`` (default) any missing or unexpected key, or any shape
    mismatch, raises :class:`CheckpointError`; keys in :data:`REGENERABLE_KEYS`
    may be absent from the file and keys in :data:`IGNORABLE_KEYS` may be extra.
    """
    raw = read_state_dict(path)
    return load_state_dict_mapped(model, raw, strict=strict)


def load_state_dict_mapped(model: nn.Module, raw: Mapping[str, torch.Tensor], *, strict: bool = True) -> LoadReport:
    """Load a checkpoint-style state dict (``module.`` prefixes allowed) into ``model``."""
    state = {to_model_key(k): v for k, v in raw.items()}
    own = model.state_dict()
    report = LoadReport()
    report.ignored = sorted(k for k in state if k not in own and k in IGNORABLE_KEYS)
    report.unexpected = sorted(k for k in state if k not in own and k not in IGNORABLE_KEYS)
    absent = sorted(k for k in own if k not in state)
    report.regenerated = [k for k in absent if k in REGENERABLE_KEYS]
    report.missing = [k for k in absent if k not in REGENERABLE_KEYS]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointError("shape mismatch (wrong architecture config?):\n  " + "\n  ".join(mismatched[:20]))
    _check_values(state, own)
    if strict and not report.clean:
        raise CheckpointError(
            f"checkpoint does not match the model: {len(report.missing)} missing keys "
            f"{report.missing[:10]}, {len(report.unexpected)} unexpected keys {report.unexpected[:10]}"
        )
    usable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def save_glip_weights(model: nn.Module, path: str | os.PathLike, data_parallel: bool = True) -> None:
    """Write the model's state dict with official key names.

    ``*.safetensors`` -> a flat safetensors file; anything else -> ``torch.save({"model": ...})``
    like the official ``.pth`` files.
    """
    state = {to_checkpoint_key(k, data_parallel): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
