"""GLIP: grounded boxes for the noun phrases of each caption (or a class list).

The network is labelmill's own PyTorch implementation
(:mod:`labelmill.models.glip`), which loads the official GLIP-T/GLIP-L
checkpoints and runs many images, each with its own caption, in one batch.

Two modes:

* ``caption`` (GLIP's Cap24M recipe): noun phrases are extracted from every
  sample's caption (spaCy POS tags + GLIP's ``<DT>?<JJ.*>*<NN.*>+`` chunk
  rule); each box row carries its ``phrase``, its character spans
  (``tokens_positive``) into the ``caption`` it grounds, and no class id.
  Samples without a caption are skipped with a warning.
* ``vocabulary``: a fixed class list becomes ``"person. bicycle. car. "``
  prompts (split into chunks when longer than the query length); rows carry
  ``class_id``/``class_name`` and export as plain COCO detections.

Every box above ``score_floor`` is stored with its score; thresholds belong
to the filter stage (GLIP's own student training kept boxes scoring 0.5+).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import Field

from labelmill.schemas.records import Label, Provenance, TeacherOutput
from labelmill.models.common import autocast_dtype
from labelmill.teachers.base import (
    ImageBatch,
    ImageRequest,
    Pending,
    Teacher,
    TeacherConfig,
    WeightsError,
    file_sha256,
)
from labelmill.teachers.maskclip import VocabularyFile
from labelmill.teachers.vocab import load_vocabulary

OFFICIAL = "https://huggingface.co/GLIPModel/GLIP"
TEST_TOKENIZER = "builtin-test"


class GLIPTeacherConfig(TeacherConfig):
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


def load_glip_tokenizer(name: str):
    if name == TEST_TOKENIZER:
        from labelmill.models.glip.testing import build_tiny_tokenizer

        return build_tiny_tokenizer()
    try:
        from labelmill.models.glip import load_tokenizer

        return load_tokenizer(name)
    except Exception as exc:
        raise WeightsError(
            f"cannot load the BERT tokenizer {name!r}: {type(exc).__name__}: {exc}. GLIP uses bert-base-uncased: "
            "download it where the hub is reachable (transformers' BertTokenizerFast.from_pretrained"
            "('bert-base-uncased').save_pretrained('bert-base-uncased')) and set 'tokenizer' to that folder."
        ) from exc


class GLIPTeacher(Teacher):
    Config = GLIPTeacherConfig
    type_name = "glip"

    def __init__(self, config: GLIPTeacherConfig, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        from labelmill.models.glip import GLIP, GLIPConfig, GLIPPredictor, load_glip_weights

        path = resolve_glip_weights(config.weights, allow_random_init)
        arch = getattr(GLIPConfig, config.architecture)()
        torch.manual_seed(0)
        model = GLIP(arch)
        if path is not None:
            load_glip_weights(model, path)
            self.weights_id = f"{config.architecture}@{os.path.basename(path)}"
            self.weights_sha = file_sha256(path)
        else:
            self.weights_id = f"{config.architecture}@random-init"
            self.weights_sha = "random-init"
        model.requires_grad_(False)
        self.tokenizer = load_glip_tokenizer(config.tokenizer)
        self.predictor = GLIPPredictor(
            model,
            self.tokenizer,
            device=device,
            min_size=config.min_size,
            max_size=config.max_size,
            pre_nms_thresh=config.pre_nms_thresh,
            nms_thresh=config.nms_thresh,
            score_floor=config.score_floor,
            max_detections_per_image=config.max_detections_per_image,
            max_batch_size=config.max_batch_size,
            canvas_sizes=config.canvas_sizes,
            autocast_dtype=autocast_dtype(config.precision, device),
        )
        self.vocab_prompts = None
        if config.mode == "vocabulary":
            spec = config.vocabulary
            if spec is None:
                raise ValueError("glip mode=vocabulary needs a vocabulary")
            vocab = load_vocabulary(spec.model_dump() if isinstance(spec, VocabularyFile) else spec)
            self.class_names = list(vocab.names)
            self.vocab_prompts = self.predictor.vocabulary_prompts(self.class_names)

    def needs_caption(self) -> bool:
        return self.config.mode == "caption"

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, self.weights_id, self.weights_sha, self.config_hash())

    def prompts(self, captions: list[str]):
        from labelmill.models.glip import caption_prompt

        return [caption_prompt(c) for c in captions]

    def torch_modules(self) -> list[torch.nn.Module]:
        model = self.predictor.model  # the predictor calls these, not GLIP.forward
        return [model.backbone, model.language_backbone, model.rpn.head]

    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        return self.predict_async(batch, upstream).result()

    def predict_async(self, batch: ImageBatch, upstream) -> Pending:
        """Forward and device post-processing now; the labels once the one host copy lands."""
        images = [batch.host_image(i) for i in range(len(batch))]
        if self.vocab_prompts is not None:
            prompts = [self.vocab_prompts] * len(batch)
        else:
            prompts = self.prompts([c or "" for c in batch.captions])
        outputs: list[TeacherOutput | None] = [None] * len(batch)
        runnable = []
        for i, p in enumerate(prompts):
            phrases = p.phrases if self.vocab_prompts is None else [ph for chunk in p for ph in chunk.phrases]
            if not phrases:
                outputs[i] = TeacherOutput(warnings=[f"teacher {self.name}: caption has no noun phrase"])
            else:
                runnable.append(i)
        if not runnable:
            return Pending.ready(outputs)
        waiting = self.predictor.predict_async([images[i] for i in runnable], [prompts[i] for i in runnable])

        def finish() -> list[TeacherOutput]:
            for i, det in zip(runnable, waiting()):
                outputs[i] = TeacherOutput(labels=self._labels(det, prompts[i], batch.work_hw[i], batch.orig_hw[i]))
            return outputs

        return Pending(finish)

    def _labels(self, det, prompt, work_hw, orig_hw) -> list[Label]:
        oh, ow = orig_hw
        sy, sx = oh / work_hw[0], ow / work_hw[1]
        if self.vocab_prompts is not None:
            owners = [(chunk, ph) for chunk in prompt for ph in chunk.phrases]
        else:
            owners = [(prompt, ph) for ph in prompt.phrases]
        labels = []
        for box, score, idx in zip(det.boxes, det.scores, det.phrase_indices):
            x1, y1, x2, y2 = (float(v) for v in box)
            # GLIP boxes use the inclusive pixel convention: width = x2 - x1 + 1
            x, y = max(0.0, x1 * sx), max(0.0, y1 * sy)
            w = min(ow, (x2 + 1) * sx) - x
            h = min(oh, (y2 + 1) * sy) - y
            if w <= 0 or h <= 0:
                continue
            chunk, phrase = owners[int(idx)]
            vocab = self.vocab_prompts is not None
            labels.append(
                Label(
                    kind="box",
                    score=float(score),
                    bbox=(x, y, w, h),
                    class_name=self.class_names[int(idx)] if vocab else phrase.text,
                    class_id=int(idx) if vocab else None,
                    area=w * h,
                    phrase=phrase.text,
                    tokens_positive=[tuple(s) for s in phrase.spans],
                    caption=chunk.caption,
                )
            )
        return labels
