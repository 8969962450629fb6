"""MaskCLIP+ student: a DeepLabv3 network whose classifier is CLIP text embeddings.

The backbone (torchvision ResNet-50/101 at output stride 8, from a local
ImageNet state dict loaded strictly, or randomly initialised only when asked;
or a tiny conv stack for tests) feeds a DeepLabv3 ASPP head that projects
every pixel into CLIP's joint space (``embed_dim``).  Pixels are scored
against the vocabulary's prompt-ensemble text embeddings (L2-normalised; a
1x1 convolution initialised from them, frozen by default), so the student
keeps the open vocabulary: new classes are new rows.  ``logits``: ``dot``
(MaskCLIP+'s head: the raw pixel features times the normalised embeddings,
no scale) or ``cosine`` (features normalised too, times ``logit_scale``).
Input normalisation follows the backbone's weights: ImageNet's for the
ResNets, CLIP's for the tiny test backbone.

Checkpoints are plain tensor files (``model.pt``, read by
:mod:`labelmill.models.safe_load`, which never runs code from a file) plus ``student.json`` (architecture,
vocabulary, provenance).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labelmill.models.common import WeightsError

NORMALIZATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet weights
}
MODEL_FILE = "model.pt"
META_FILE = "student.json"


def normalization_for(backbone: str) -> str:
    """The input normalisation a backbone's weights expect: ImageNet's for the ResNets, CLIP's for ``tiny``."""
    return "clip" if backbone == "tiny" else "imagenet"


class StudentCheckpointError(WeightsError):
    """A student checkpoint is missing, incomplete or not a plain tensor file."""


@dataclass
class StudentSpec:
    backbone: str
    vocabulary: list[str]
    embed_dim: int
    logit_scale: float = 50.0
    freeze_classifier: bool = True
    extra: dict = field(default_factory=dict)  # provenance: dataset, step, teacher ...
    logits: str = "cosine"        # "dot" (MaskCLIP+'s head) or "cosine" (x logit_scale); older checkpoints: cosine
    normalization: str = "clip"   # input mean/std (NORMALIZATION); older checkpoints: clip


def _tiny_backbone() -> tuple[nn.Module, int]:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = block(3, 16, 2) + block(16, 32, 2) + block(32, 32, 1) + block(32, 64, 2) + block(64, 64, 1)
    return nn.Sequential(*layers), 64


class _ResNetBody(nn.Module):
    def __init__(self, name: str, weights_path: str | None):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
        if weights_path:
            load_backbone(net, weights_path, name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

    def forward(self, x):
        return self.layers(self.stem(x))


def load_backbone(net: nn.Module, path: str, name: str) -> None:
    """Load a torchvision ResNet state dict strictly: every key but the classifier (``fc.*``) must match."""
    state = {k.removeprefix("module."): v for k, v in load_tensors(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        def some(keys):
            return f"{keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"

        raise WeightsError(f"backbone_weights {path} does not fit torchvision's {name}: "
                           + "; ".join(part for part in (missing and f"missing {some(missing)}",
                                                         unexpected and f"unexpected {some(unexpected)}",
                                                         shape and f"other shapes {some(shape)}") if part))
    net.load_state_dict(state, strict=False)  # fc.* stays as built: the student never uses it


class SegStudent(nn.Module):
    def __init__(self, spec: StudentSpec, text_embeddings: torch.Tensor | None = None,
                 backbone_weights: str | None = None):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.spec = spec
        if spec.backbone == "tiny":
            self.backbone, channels = _tiny_backbone()
            aspp = ASPP(channels, [2, 4, 6], out_channels=32)
            width = 32
        elif spec.backbone in ("resnet50", "resnet101"):
            self.backbone, channels = _ResNetBody(spec.backbone, backbone_weights), 2048
            aspp = ASPP(channels, [12, 24, 36], out_channels=256)
            width = 256
        else:
            raise ValueError(f"unknown student backbone {spec.backbone!r}: resnet50, resnet101 or tiny")
        self.head = nn.Sequential(
            aspp, nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, spec.embed_dim, 1),
        )
        self.classifier = nn.Conv2d(spec.embed_dim, len(spec.vocabulary), 1, bias=False)
        if text_embeddings is not None:
            if tuple(text_embeddings.shape) != (len(spec.vocabulary), spec.embed_dim):
                raise ValueError(f"text embeddings {tuple(text_embeddings.shape)} do not match "
                                 f"{len(spec.vocabulary)} classes x {spec.embed_dim}")
            with torch.no_grad():
                self.classifier.weight.copy_(F.normalize(text_embeddings.float(), dim=-1)[:, :, None, None])
        self.classifier.weight.requires_grad_(not spec.freeze_classifier)
        if spec.logits not in ("dot", "cosine"):
            raise ValueError(f"student logits must be 'dot' or 'cosine', not {spec.logits!r}")
        mean, std = NORMALIZATION[spec.normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> logits (B, C, H, W)."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float().div(255)
        x = (images - self.mean) / self.std
        feats = self.head(self.backbone(x))
        weight = F.normalize(self.classifier.weight, dim=1)
        if self.spec.logits == "dot":
            logits = F.conv2d(feats, weight)
        else:
            logits = F.conv2d(F.normalize(feats, dim=1), weight) * self.spec.logit_scale
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- checkpoints
def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors, read by :func:`labelmill.models.safe_load.read_tensors` (no code runs)."""
    from labelmill.models.safe_load import check_finite, read_tensors

    if not os.path.isfile(path):
        raise StudentCheckpointError(f"checkpoint file {path} does not exist")
    try:
        state = read_tensors(path)
        check_finite(state, path)
    except WeightsError as exc:
        raise StudentCheckpointError(str(exc)) from None
    if not state:
        raise StudentCheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def save_student(model: SegStudent, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    core = getattr(model, "module", model)
    torch.save({k: v.detach().cpu() for k, v in core.state_dict().items()}, os.path.join(folder, MODEL_FILE))
    with open(os.path.join(folder, META_FILE), "w") as fh:
        json.dump(asdict(core.spec), fh, indent=2)


def read_spec(path: str) -> tuple[StudentSpec, str]:
    """(spec, model file) of a checkpoint folder or of a model.pt beside its student.json."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    model_file = os.path.join(folder, MODEL_FILE) if os.path.isdir(path) else path
    meta = os.path.join(folder, META_FILE)
    if not os.path.exists(path):
        raise StudentCheckpointError(f"student checkpoint {path} does not exist")
    if not os.path.isfile(meta):
        raise StudentCheckpointError(f"{folder} has no {META_FILE}: not a labelmill student checkpoint")
    with open(meta) as fh:
        spec = StudentSpec(**json.load(fh))
    return spec, model_file


def load_student(path: str, device: torch.device | str = "cpu") -> SegStudent:
    spec, model_file = read_spec(path)
    model = SegStudent(spec)
    state = load_tensors(model_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StudentCheckpointError(f"{model_file} does not fit a {spec.backbone} student: "
                                     f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()
