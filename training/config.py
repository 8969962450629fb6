"""Training configs: YAML in, validated pydantic objects out (like ``labelmill run``).

Overrides are ``key.path=value`` pairs; every problem is reported with its
key path before any work starts (exit code 2).
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labelmill.config import ConfigError, read_config_data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataSection(_Strict):
    output: str = Field(description="a labelmill output (local or s3://) holding the teacher's labels")
    version: int | str | None = Field(default=None, description="dataset version (number or ISO time); default latest")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the output")
    shard_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for reading the original shards (images by key)")
    teacher: str | None = Field(default=None, description="teacher instance whose labels to learn; default: the only one")
    threshold: float = Field(default=0.0, ge=0, le=1, description="load-time minimum label score")
    image_size: int = Field(default=512, ge=16, description="side of the square training crop")
    scale: tuple[float, float] = Field(default=(0.5, 2.0), description="random rescale range")
    hflip: bool = True
    augment: bool = True
    img_scale: tuple[int, int] | None = Field(
        default=None, description="(long, short): mmseg's resize rule, the image scaled by r x min(long / its "
        "long side, short / its short side), r drawn from scale; default: r x fit the long side into the crop")
    photometric: bool = Field(default=False, description="mmseg's PhotoMetricDistortion (brightness, contrast, "
                              "saturation, hue)")
    pad: Literal["black", "mean"] = Field(default="black", description="pad crops with black or with the "
                                          "normalisation's mean colour (0 after normalising, like inference)")
    cat_max_ratio: float | None = Field(default=None, gt=0, le=1, description="retry crops (up to 10 times) in "
                                        "which one class covers more than this share of the labelled pixels")
    min_size: list[Annotated[int, Field(ge=16)]] | None = Field(
        default=None, min_length=1, description="box training (GLIP): the short side is resized to one of these "
        "(drawn per image), the long side capped at max_size, nothing cropped, the batch padded with the mean "
        "colour as inference pads; null: square crops of image_size")
    max_size: int | None = Field(default=None, ge=16, description="box training: cap of the long side "
                                 "(GLIP's MAX_SIZE_TRAIN); default: no cap")
    repeat: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        default="auto", description="passes over the version per Ray Data iteration; auto: enough for the whole "
        "run from the count of labelled images, so Ray Data starts once (each restart costs its start-up)")
    max_image_pixels: int = Field(default=90_000_000, gt=0)
    read_cpus: float = Field(default=0.25, gt=0, description="CPU reservation of a shard-reading task")
    prepare_cpus: float = Field(default=0.25, gt=0, description="CPU reservation of a decode+target+augment worker")
    prepare_workers: int = Field(default=1, gt=0, description="decode+target+augment actors")


class OptimSection(_Strict):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["poly", "cosine", "constant", "multistep"] = Field(
        default="poly", description="multistep: x 0.1 at 67 % and 89 % of max_steps (GLIP's STEPS)")
    min_lr: float = Field(default=0.0, ge=0, description="the schedule decays to this lr, not to 0 (mmcv's min_lr)")
    warmup_steps: int = Field(default=0, ge=0)
    max_steps: int = Field(default=1000, gt=0, description="optimizer steps in total (resumes continue the count)")
    batch_size: int = Field(default=8, gt=0, description="images per worker per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    bf16: bool = Field(default=True, description="bf16 autocast on GPU (ignored on CPU)")
    grad_clip: float | None = Field(default=None, gt=0)
    ema: float | None = Field(default=None, gt=0, lt=1, description="decay of an exponential moving average of "
                              "the weights; checkpoints then serve the averaged weights (the live ones are kept to "
                              "resume)")
    seed: int = 0


class ScalingSection(_Strict):
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float | None = Field(default=None, gt=0)


class CheckpointSection(_Strict):
    path: str = Field(description="Ray Train storage path (local folder or s3://bucket/prefix)")
    name: str = Field(default="student", description="run name; re-running the same name resumes")
    every_steps: int = Field(default=500, gt=0)
    keep: int = Field(default=2, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3:// paths")


class RaySection(_Strict):
    address: str | None = None
    num_cpus: float | None = Field(default=None, gt=0)


class SelfTraining(_Strict):
    start_step: int | None = Field(
        default=None, ge=0, description="from this step, pixels without gold take the argmax of the pass's own "
        "logits over the unseen classes (all classes without transductive)")
    threshold: float = Field(default=0.0, ge=0, le=1, description="pixels less confident than this stay "
                             "unlabelled (0: none, as in MaskCLIP+)")


class Transductive(_Strict):
    seen_classes: list[str] = Field(description="classes whose gold masks come from the shards' json annotations")


class SegModel(_Strict):
    backbone: Literal["resnet50", "resnet101", "tiny"] = "resnet101"
    embed_dim: int | None = Field(default=None, gt=0, description="default: the text embeddings' width")
    logits: Literal["dot", "cosine"] = Field(
        default="dot", description="dot: MaskCLIP+'s head (raw features x normalised text embeddings); "
        "cosine: features normalised too, x logit_scale")
    logit_scale: float = Field(default=50.0, gt=0, description="cosine logits only")
    freeze_classifier: bool = Field(default=True, description="keep the text-embedding classifier fixed (open vocabulary)")
    text_embeddings: str | None = Field(
        default=None, description="Parquet file from `labelmill text-embeddings`; default: computed with the "
        "teacher's own CLIP, vocabulary and prompt templates (from the output's run config)")
    init_from: str | None = Field(default=None, description="a student checkpoint (directory or model.pt) to start from")
    backbone_weights: str | None = Field(
        default=None, description="local torchvision ImageNet state dict for the ResNet, loaded strictly (fc.* "
        "aside); required for resnet50/101 unless random_init")
    random_init: bool = Field(default=False, description="allow a randomly initialised ResNet (tests, demo)")

    @model_validator(mode="after")
    def _backbone_has_weights(self) -> "SegModel":
        if self.backbone != "tiny" and not self.backbone_weights and not self.random_init and not self.init_from:
            raise ValueError(f"model.backbone_weights is required for {self.backbone} (a local torchvision "
                             "ImageNet state dict, as MaskCLIP+ starts from); set model.random_init: true to "
                             "train from random weights on purpose")
        return self


class TrainCommon(_Strict):
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection
    ray: RaySection = Field(default_factory=RaySection)
    report_interval_s: float = Field(
        default=2.0, ge=0, description="report the latest step's metrics to Ray Train at most this often "
        "(every step is written to the metrics table)")


class MaskCLIPPlusConfig(TrainCommon):
    task: Literal["maskclip-plus"] = "maskclip-plus"
    model: SegModel = Field(default_factory=SegModel)
    self_training: SelfTraining = Field(default_factory=SelfTraining)
    transductive: Transductive | None = None


class GoldSection(_Strict):
    path: str = Field(description="ODVG JSONL or MDETR/COCO grounding JSON")
    images: str = Field(description="folder of the gold images (file_name is relative to it)")
    format: Literal["odvg", "mdetr"] | None = Field(default=None, description="default: from the file suffix")
    copies: int = Field(default=4, gt=0, description="how many times this set counts against the pseudo-labels "
                        "when gold_ratio is auto (GLIP-L's MIXED_COPY 4 for GoldG's mixed set; FLICKR_COPY is 8)")


class GLIPModel(_Strict):
    preset: Literal["glip_l", "glip_t", "tiny"] = "glip_l"
    overrides: dict[str, Any] = Field(default_factory=dict, description="GLIPConfig fields to replace")
    # training-only regularisers (identity in eval), defaults as GLIP's configs: see training/glip.py
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1, description="Swin stochastic depth; default "
                                         "0.4 for glip_l (GLIP-L's config), 0.2 otherwise (GLIP's default)")
    fpn_drop_block: float = Field(default=0.3, ge=0, lt=1, description="FPN DropBlock probability (GLIP: 0.3)")
    fpn_drop_block_size: int = Field(default=3, gt=0, description="FPN DropBlock size (GLIP: 3)")
    fusion_dropout: float = Field(default=0.1, ge=0, lt=1, description="fusion attention dropout (GLIP: 0.1)")
    head_text_dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout in the head's BERT layers "
                                     "(BERT's 0.1)")
    init_from: str | None = Field(default=None, description="official GLIP weights or an earlier round's checkpoint")
    tokenizer: str = Field(description="local BERT tokenizer folder")
    freeze_language: bool = False
    freeze_backbone: bool = False
    language_lr_scale: float = Field(default=0.1, ge=0, description="GLIP's LANG_LR / BASE_LR")
    backbone_lr_scale: float = Field(default=1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_unsafe_pickle(cls, data: Any) -> Any:
        if isinstance(data, dict) and "allow_unsafe_pickle" in data:
            raise ValueError("allow_unsafe_pickle was removed: labelmill never runs code from a weights file; "
                             "convert the checkpoint once with `labelmill convert-weights SRC DST.safetensors "
                             "--trust-source` on a machine you trust and set init_from to DST")
        return data


class GLIPLoss(_Strict):
    atss_topk: int = Field(default=9, gt=0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_weight: float = 2.0
    centerness_weight: float = 1.0


#: GLIP's training recipe (configs/pretrain/glip_Swin_T_O365_GoldG.yaml, glip_Swin_L.yaml): what a GLIP config's
#: missing keys take (load_train_config); weight decay 0.01 for glip_l, as GLIP-L's config
GLIP_RECIPE = {
    # self-training keeps teacher boxes above 0.5; multi-scale resize, no crop, mean-colour padding
    "data": {"threshold": 0.5, "min_size": [480, 560, 640, 720, 800], "max_size": 1333, "pad": "mean"},
    "optim": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "schedule": "multistep", "warmup_steps": 2000,
              "grad_clip": 1.0, "ema": 0.999},
}


class GLIPTrainConfig(TrainCommon):
    task: Literal["glip"] = "glip"
    model: GLIPModel
    gold: list[GoldSection] = Field(default_factory=list)
    gold_ratio: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        default="auto", description="share of each batch drawn from gold data; auto: GLIP's rule, the sets "
        "sampled in proportion to their sizes x copies (each gold slot drawn per batch)")
    negative_captions: int = Field(default=20, ge=0, description="caption data: up to this many other "
                                   "captions packed into a prompt as negatives (GLIP's PACK_RANDOM_CAPTION_NUMBER)")
    negative_captions_none: float = Field(default=0.4, ge=0, le=1, description="chance of a prompt with no "
                                          "packed caption (NO_RANDOM_PACK_PROBABILITY)")
    negative_captions_all: float = Field(default=0.5, ge=0, le=1, description="otherwise, chance of packing all "
                                         "negative_captions, else a number drawn below it (RANDOM_PACK_PROB)")
    loss: GLIPLoss = Field(default_factory=GLIPLoss)
    max_prompt_classes: int = Field(default=85, gt=0, description="vocabulary-mode prompts: the image's classes "
                                    "plus absent ones (negatives) up to this many names, shuffled (GLIP's 85)")


TASKS = {"maskclip-plus": MaskCLIPPlusConfig, "glip": GLIPTrainConfig}


def _format(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        out.append(f"{loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
    return "; ".join(out)


#: MaskCLIP+'s published training settings (chongzhou96/MaskCLIP, configs/maskclip_plus/ and its mmseg
#: bases), as config sections a user's own config overrides key by key; see the README's table
_MMSEG_SGD = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "schedule": "poly",
              "min_lr": 0.0001, "warmup_steps": 0, "batch_size": 4}
_MMSEG_PIPELINE = {"scale": [0.5, 2.0], "hflip": True, "augment": True, "photometric": True, "pad": "mean",
                   "cat_max_ratio": 0.75}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "maskclip-plus": {
        # annotation-free COCO-Stuff 164k (..._512x512_8k_coco-stuff164k): never self-trains
        "coco-stuff": {"data": {**_MMSEG_PIPELINE, "image_size": 512, "img_scale": [2048, 512]},
                       "optim": {**_MMSEG_SGD, "max_steps": 8000}, "model": {"logits": "dot"}},
        # annotation-free PASCAL Context 59 (..._480x480_4k_pascal_context_59)
        "context": {"data": {**_MMSEG_PIPELINE, "image_size": 480, "img_scale": [520, 520]},
                    "optim": {**_MMSEG_SGD, "max_steps": 4000}, "model": {"logits": "dot"}},
        # zero-shot PASCAL VOC (..._512x512_20k_voc12aug): self-training from 1/10 of the schedule
        "zero-shot-voc": {"data": {**_MMSEG_PIPELINE, "image_size": 512, "img_scale": [2048, 512]},
                          "optim": {**_MMSEG_SGD, "max_steps": 20000}, "model": {"logits": "dot"},
                          "self_training": {"start_step": 2000, "threshold": 0.0}},
    },
}


def _merged(base: dict, mine: dict) -> dict:
    out = dict(base)
    for key, value in mine.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_train_config(task: str, source: str | Path | dict, overrides: list[str] | None = None,
                      preset: str | None = None):
    """Read, override and validate a training config (on top of ``preset``'s settings).  Raises ConfigError."""
    if task not in TASKS:
        raise ConfigError(f"unknown training task {task!r}: {sorted(TASKS)}")
    data = read_config_data(source, overrides)
    # one rule for defaults under the config's own keys: the task's published recipe, then a preset's
    base = task_recipe(task, data)
    if preset is not None:
        known = PRESETS.get(task, {})
        if preset not in known:
            raise ConfigError(f"unknown --preset {preset!r} for {task}: {sorted(known) or 'none'}")
        base = _merged(base, known[preset])
    data = _merged(base, data)
    data.setdefault("task", task)
    try:
        cfg = TASKS[task].model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    return resolve_local_paths(cfg)


def task_recipe(task: str, data: dict) -> dict:
    """The defaults a task's config takes where it is silent: GLIP's training recipe; none for MaskCLIP+."""
    if task != "glip":
        return {}
    recipe = {k: dict(v) for k, v in GLIP_RECIPE.items()}
    if (data.get("model") or {}).get("preset", "glip_l") == "glip_l":
        recipe["optim"]["weight_decay"] = 0.01
    return recipe


def _local(path: str | None) -> str | None:
    return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))


def resolve_local_paths(cfg):
    """Every local path the config names, made absolute on the driver: Ray Train's workers and the data
    actors do not run in the directory the command ran in."""
    cfg.data.output = _local(cfg.data.output)
    cfg.checkpoint.path = _local(cfg.checkpoint.path)
    m = cfg.model
    for name in ("backbone_weights", "init_from", "text_embeddings"):
        if hasattr(m, name):
            setattr(m, name, _local(getattr(m, name)))
    if hasattr(m, "tokenizer") and m.tokenizer != "builtin-test":
        m.tokenizer = _local(m.tokenizer)
    for gold in getattr(cfg, "gold", []):
        gold.path, gold.images = _local(gold.path), _local(gold.images)
    return cfg
