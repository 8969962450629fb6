"""Configs of the built-in teachers: pydantic models, no torch.

Validating a run config (``labelmill run --dry-run``, every CLI command that
reads a config, the CPU pools) needs these and nothing else: the networks,
their weights and torch load only where a teacher is built
(:func:`labelmill.teachers.base.build_teacher`). Each teacher module
re-exports its config under its old name.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from labelmill.schemas.records import ImageRequest
from labelmill.teachers.base import TeacherConfig, WeightsError


# ------------------------------------------------------------------ MaskCLIP
class Refinement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    threshold: float = Field(ge=0, le=1)


class PromptDenoising(Refinement):
    keep_all_if_none_pass: bool = Field(
        default=True,
        description="when every class of an image falls below the threshold, drop none (the reference "
        "drops all, which leaves equal scores and labels every pixel with class 0)",
    )


class KeySmoothing(Refinement):
    rule: Literal["reference", "cosine"] = Field(
        default="reference",
        description="reference: W = K K^T with keys L2-normalised over positions (MaskCLIP); cosine: "
        "cosine similarity of keys, negatives clamped to 0, rows normalised to sum 1 (labelmill's earlier "
        "rule: smoothed scores stay probability distributions)",
    )


class VocabularyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str


class CLIPModelFields(TeacherConfig):
    """How to build and load the open_clip model (shared with the ViLD embedder)."""

    model: str = Field(default="ViT-B-16", description="open_clip architecture or hf-hub:org/repo")
    pretrained: str | None = Field(
        default="openai", description="open_clip pretrained tag or a local checkpoint file"
    )
    arch_config: dict | None = Field(default=None, description="inline open_clip model config (custom archs)")
    quick_gelu: bool | None = Field(
        default=None,
        description="QuickGELU (OpenAI-trained weights) or GELU; default: from the pretrained tag, or QuickGELU "
        "for OpenAI-format local files; other local files must say",
    )
    cache_dir: str | None = None
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def preflight(self, allow_random_init: bool) -> None:
        from labelmill.models.openclip import check_activation, resolve_quick_gelu, resolve_weights
        from labelmill.models.safe_load import check_readable

        path = None
        if self.arch_config is None and not self.model.startswith("hf-hub:"):
            check_activation(self.model, self.quick_gelu)
            path, _, tag_cfg = resolve_weights(
                self.model, self.pretrained, allow_random_init=allow_random_init, cache_dir=self.cache_dir
            )
            if path is not None and not tag_cfg:
                resolve_quick_gelu(self.model, path, self.quick_gelu)
        elif self.pretrained is None and not allow_random_init:
            name = "inline arch_config" if self.arch_config is not None else self.model
            resolve_weights(name, None, allow_random_init=False)
        elif self.pretrained is not None and self.arch_config is not None:
            if not os.path.isfile(self.pretrained):  # an inline architecture has no tags: a local file or nothing
                raise WeightsError(f"CLIP weights file {self.pretrained!r} does not exist")
            path = self.pretrained
        if path is not None:
            check_readable(path)  # refuses a file that would run code, running none of it

    def load(self, allow_random_init: bool):
        from labelmill.models.openclip import load_clip

        return load_clip(
            self.model,
            self.pretrained,
            arch_config=self.arch_config,
            allow_random_init=allow_random_init,
            quick_gelu=self.quick_gelu,
            cache_dir=self.cache_dir,
        )


class MaskCLIPConfig(CLIPModelFields):
    """MaskCLIP settings; the defaults are the paper's COCO-Stuff evaluation (ViT-B/16, whole mode at
    short side 512, long side at most 2048, key smoothing 1.0, prompt denoising 0.5)."""

    host_side_path: ClassVar[str | None] = "labelmill.teachers.hosts:MaskCLIPHost"

    type: Literal["maskclip"] = "maskclip"
    vocabulary: str | list[str] | VocabularyFile = "coco-stuff-171"
    background: list[str] = Field(default_factory=list, description="classes whose pixels give no mask")
    templates: str | list[str] = "maskclip85"
    logit_scale: float | None = Field(default=None, gt=0, description="default: the model's own (100 for OpenAI)")
    mode: Literal["whole", "slide"] = "whole"
    image_size: int = Field(
        default=512, ge=32,
        description="whole mode: short side of the resized image (paper: 512 for COCO-Stuff; PASCAL Context bounds the "
        "long side at 520 instead: image_size 520 with whole_max_long_side 520)",
    )
    whole_max_long_side: int = Field(default=2048, ge=32, description="whole mode: long side at most")
    slide_short_side: int = Field(default=512, ge=32)
    slide_max_long_side: int = Field(default=2048, ge=32)
    slide_crop: int = Field(default=512, ge=32, description="slide mode: window side (mmseg COCO-Stuff: 512)")
    slide_stride: int = Field(default=341, ge=1, description="slide mode: window step (mmseg COCO-Stuff: 341)")
    window_batch_size: int = Field(default=32, gt=0, description="windows (or images) per forward")
    key_smoothing: KeySmoothing = Field(default_factory=lambda: KeySmoothing(enabled=True, threshold=1.0))
    prompt_denoising: PromptDenoising = Field(
        default_factory=lambda: PromptDenoising(enabled=True, threshold=0.5)
    )
    pixel_threshold: float = Field(default=0.0, ge=0, le=1, description="pixels below stay unlabelled")
    candidate_topk: int = Field(
        default=0, ge=0,
        description="only classes in the top-k of some patch compete in the argmax (faster, approximate); 0 = all",
    )
    label_resolution: int = Field(
        default=0, ge=0,
        description="long side at which the label map is computed before nearest upsampling (faster, "
        "approximate); 0 = the original size, as the reference",
    )

    def image_request(self) -> ImageRequest:
        if self.mode == "whole":
            return ImageRequest(short_side=self.image_size, max_long_side=self.whole_max_long_side)
        return ImageRequest(short_side=self.slide_short_side, max_long_side=self.slide_max_long_side)

    @model_validator(mode="after")
    def _check(self) -> "MaskCLIPConfig":
        if self.slide_stride > self.slide_crop:
            raise ValueError("slide_stride must not exceed slide_crop (windows would leave gaps)")
        return self


# ---------------------------------------------------------------------- GLIP
OFFICIAL = "https://huggingface.co/GLIPModel/GLIP"
TEST_TOKENIZER = "builtin-test"


class GLIPTeacherConfig(TeacherConfig):
    host_side_path: ClassVar[str | None] = "labelmill.teachers.hosts:GLIPHost"

    type: Literal["glip"] = "glip"
    architecture: Literal["glip_t", "glip_l", "tiny"] = "glip_t"
    weights: str | None = Field(
        default=None,
        description="checkpoint file (.pth or .safetensors), or hf://org/repo/file to download where reachable",
    )
    tokenizer: str = Field(default="bert-base-uncased", description="BERT tokenizer: local folder or HF id")
    mode: Literal["caption", "vocabulary"] = "caption"
    vocabulary: str | list[str] | VocabularyFile | None = None
    min_size: int = Field(default=800, ge=32, description="GLIP resizes the short side to this (800 = checkpoint's)")
    max_size: int = Field(default=1333, ge=32)
    score_floor: float = Field(default=0.05, ge=0, le=1, description="boxes below are not stored")
    pre_nms_thresh: float | None = Field(default=None, ge=0, le=1)
    nms_thresh: float | None = Field(default=None, ge=0, le=1)
    max_detections_per_image: int = Field(default=100, gt=0)
    canvas_sizes: list[tuple[int, int]] | None = Field(
        default=None, description="pad images to the smallest fitting canvas so batches group (see docs)"
    )
    max_batch_size: int = Field(default=8, gt=0)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    preprocess: Literal["auto", "pil", "device"] = Field(
        default="auto",
        description="where images are resized and normalised to GLIP's input: 'pil' (PIL bilinear on the host, "
        "the reference), 'device' (antialiased bilinear from uint8 on the teacher's device; pixel differences "
        "documented in the README), 'auto' (device on CUDA, pil on CPU)",
    )

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=self.min_size, max_long_side=self.max_size)

    def preflight(self, allow_random_init: bool) -> None:
        if self.mode == "vocabulary" and self.vocabulary is None:
            raise ValueError("glip mode=vocabulary needs a vocabulary")
        path = resolve_glip_weights(self.weights, allow_random_init, download=False)
        if path is not None:
            from labelmill.models.safe_load import check_readable

            check_readable(path)  # refuses a file that would run code, reading none of it
        if self.tokenizer == TEST_TOKENIZER and self.weights is not None:
            raise ValueError(f"tokenizer {TEST_TOKENIZER!r} is for random-weight demos; real GLIP needs bert-base-uncased")


def resolve_glip_weights(spec: str | None, allow_random_init: bool, download: bool = True) -> str | None:
    """Local path of the GLIP checkpoint, None for random init, or WeightsError."""
    how = (
        f"Download glip_tiny_model_o365_goldg.pth (GLIP-T) or glip_large_model.pth (GLIP-L) from {OFFICIAL} "
        "where the hub is reachable and set 'weights' to the file, or use weights: hf://GLIPModel/GLIP/<file>."
    )
    if spec is None:
        if allow_random_init:
            return None
        raise WeightsError(f"GLIP teacher has no weights. {how} Random weights are only allowed in `labelmill demo`.")
    if spec.startswith("hf://"):
        repo_file = spec[len("hf://"):]
        parts = repo_file.split("/")
        if len(parts) < 3:
            raise WeightsError(f"{spec!r}: expected hf://org/repo/file")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo, filename, local_files_only=not download)
        except Exception as exc:
            if not download:
                return None  # resolved for real inside the actor, which may download
            raise WeightsError(f"could not fetch {spec}: {type(exc).__name__}: {exc}. {how}") from exc
    if not os.path.isfile(spec):
        raise WeightsError(f"GLIP weights file {spec!r} does not exist. {how}")
    return spec


# ---------------------------------------------------------------------- ViLD
#: the ``sources`` value of the whole-image region
WHOLE_IMAGE = "image"

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
    host_side_path: ClassVar[str | None] = "labelmill.teachers.hosts:ViLDHost"

    type: Literal["vild"] = "vild"
    emits_labels: ClassVar[bool] = False  # region rows (boxes + embeddings), not labels
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


# ------------------------------------------------------------------- student
class StudentTeacherConfig(TeacherConfig):
    type: Literal["student"] = "student"
    checkpoint: str = Field(description="student checkpoint folder (model.pt + student.json) or its model.pt")
    vocabulary: list[str] | None = Field(default=None, description="optional: must equal the checkpoint's")
    image_size: int = Field(default=512, ge=16, description="long side the student sees")
    background: list[str] = Field(default_factory=list, description="classes whose pixels give no mask")
    pixel_threshold: float = Field(default=0.0, ge=0, le=1, description="pixels below stay unlabelled")

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=self.image_size, max_long_side=self.image_size)

    def _meta(self) -> dict | None:
        folder = self.checkpoint if os.path.isdir(self.checkpoint) else os.path.dirname(self.checkpoint)
        path = os.path.join(folder, "student.json")
        if not os.path.isfile(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    @model_validator(mode="after")
    def _vocabulary_matches(self) -> "StudentTeacherConfig":
        meta = self._meta()
        if meta is None:
            return self  # preflight reports the missing checkpoint
        if self.vocabulary is not None and list(self.vocabulary) != list(meta["vocabulary"]):
            raise ValueError(f"vocabulary mismatch: the config names {len(self.vocabulary)} classes but the student "
                             f"checkpoint was trained on {len(meta['vocabulary'])} different ones "
                             f"({meta['vocabulary'][:4]} ...); drop 'vocabulary' or retrain")
        unknown = [b for b in self.background if b not in meta["vocabulary"]]
        if unknown:
            raise ValueError(f"background {unknown} not in the student's vocabulary")
        return self

    def class_names(self) -> list[str] | None:
        meta = self._meta()
        return list(meta["vocabulary"]) if meta is not None else None

    def preflight(self, allow_random_init: bool) -> None:
        if self._meta() is None or not os.path.exists(self.checkpoint):
            raise WeightsError(f"student checkpoint {self.checkpoint} not found (a folder with model.pt and "
                               "student.json, as `labelmill train maskclip-plus` writes)")
        from labelmill.models.deeplab import read_spec
        from labelmill.models.safe_load import check_readable

        check_readable(read_spec(self.checkpoint)[1])  # refuses a file that would run code, reading none of it


# ---------------------------------------------------------------------- null
class NullTeacherConfig(TeacherConfig):
    host_side_path: ClassVar[str | None] = "labelmill.teachers.hosts:NullHost"

    type: Literal["null"] = "null"
    short_side: int = Field(default=448, gt=0, description="working resolution the decoder delivers")
    max_long_side: int = Field(default=1333, gt=0)

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=self.short_side, max_long_side=self.max_long_side)
