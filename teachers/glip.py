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

import numpy as np
import torch

from labelmill.models.common import autocast_dtype
from labelmill.schemas.raw import RawBatch
from labelmill.schemas.records import Provenance, TeacherOutput
from labelmill.teachers.base import FinishInfo, ImageBatch, Pending, Teacher, WeightsError, file_sha256
from labelmill.teachers.configs import TEST_TOKENIZER, GLIPTeacherConfig, resolve_glip_weights

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
            device_preprocess=self.device_preprocess,
        )
        self.vocab_prompts = None
        if config.mode == "vocabulary":
            if config.vocabulary is None:
                raise ValueError("glip mode=vocabulary needs a vocabulary")
            self.class_names, chunks = self.host.vocabulary_chunks
            self.vocab_prompts = self.predictor.tokenized(chunks)  # tokenised once per actor

    @property
    def device_preprocess(self) -> bool:
        """Resize and normalise on the device (``preprocess: device``, or ``auto`` on CUDA)."""
        pre = self.config.preprocess
        return pre == "device" or (pre == "auto" and self.device.type == "cuda")

    def needs_caption(self) -> bool:
        return self.config.mode == "caption"

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, self.weights_id, self.weights_sha, self.config_hash())

    def torch_modules(self) -> list[torch.nn.Module]:
        model = self.predictor.model  # the predictor calls these, not GLIP.forward
        return [model.backbone, model.language_backbone, model.rpn.head]

    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        return self.predict_split(batch, upstream)

    def predict_async(self, batch: ImageBatch, upstream) -> Pending:
        """Prompts on the host, forward and device post-processing now, the labels once the one host copy
        lands (all in this process)."""
        prepared = self.host.prepare(list(batch.captions), list(batch.metas))
        pending, info = self.infer_async(batch, upstream, prepared), FinishInfo.of(batch, prepared)
        return Pending(lambda: self.host.finish(pending.result(), info))

    def infer_async(self, batch: ImageBatch, upstream, prepared) -> Pending:
        """Forward and device post-processing of the images that have phrases; the :class:`Pending` gives
        the raw detections (:class:`~labelmill.teachers.hosts.GLIPHost` turns them into labels)."""
        n = len(batch)
        if self.vocab_prompts is not None:
            prompts = [self.vocab_prompts] * n
        else:
            prompts = [self.host.tokenized(p) if p and p["phrases"] else None for p in (prepared or [None] * n)]
        runnable = [i for i in range(n) if prompts[i] is not None]
        work_hw = np.array([tuple(hw) for hw in batch.work_hw], np.int64).reshape(n, 2)
        if not runnable:
            return Pending.ready(self._raw(np.zeros((0, 6)), [0] * n, work_hw))
        pick = batch.image if self.device_preprocess else batch.host_image
        waiting = self.predictor.predict_packed([pick(i) for i in runnable], [prompts[i] for i in runnable])

        def finish() -> RawBatch:
            packed, counts = waiting()
            per_image = [0] * n
            for i, c in zip(runnable, counts):
                per_image[i] = c
            return self._raw(packed, per_image, work_hw)

        return Pending(finish)

    @staticmethod
    def _raw(packed: np.ndarray, counts: list[int], work_hw: np.ndarray) -> RawBatch:
        return RawBatch.from_counts({"dets": np.asarray(packed, np.float64).reshape(-1, 6), "work_hw": work_hw},
                                    {"dets": counts, "work_hw": np.ones(len(counts), np.int64)})
