"""A trained MaskCLIP+ student as a teacher (``type: student``).

``checkpoint`` is a student checkpoint folder (``model.pt`` + ``student.json``,
as ``labelmill train maskclip-plus`` writes) or its ``model.pt``.  The
vocabulary is the checkpoint's; naming a different one in the config is an
error rather than silently relabelled classes.  ``labelmill run`` then
relabels shards with the student into a new output (a new dataset version),
which the next training round reads::

    teachers:
      - type: student
        checkpoint: runs/round1/checkpoint_000003
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from labelmill.schemas.records import Label, Provenance, TeacherOutput
from labelmill.teachers.base import ImageBatch, Teacher, WeightsError, file_sha256
from labelmill.teachers.configs import StudentTeacherConfig


class StudentTeacher(Teacher):
    Config = StudentTeacherConfig
    type_name = "student"

    def __init__(self, config: StudentTeacherConfig, device: torch.device, allow_random_init: bool = False):
        super().__init__(config, device, allow_random_init)
        from labelmill.models.deeplab import StudentCheckpointError, load_student, read_spec

        try:
            spec, self.model_file = read_spec(config.checkpoint)
            self.model = load_student(config.checkpoint, device)
        except StudentCheckpointError as exc:
            raise WeightsError(str(exc)) from None
        self.vocabulary = list(spec.vocabulary)
        self.background = {self.vocabulary.index(b) for b in config.background}
        self.sha256 = file_sha256(self.model_file)

    def provenance(self) -> Provenance:
        return self.clip_provenance(os.path.abspath(self.model_file), self.sha256)

    @torch.inference_mode()
    def predict(self, batch: ImageBatch, upstream) -> list[TeacherOutput]:
        outputs = []
        for i in range(len(batch)):
            img = batch.image(i)[None]  # (1, h, w, 3) uint8
            probs = self.model(img).float().softmax(1)
            probs = F.interpolate(probs, size=tuple(batch.orig_hw[i]), mode="bilinear", align_corners=False)[0]
            outputs.append(TeacherOutput(labels=self._labels(probs)))
        return outputs

    def _labels(self, probs: torch.Tensor) -> list[Label]:
        conf, pred = probs.max(0)
        conf_np, pred_np = conf.cpu().numpy(), pred.cpu().numpy()
        if self.config.pixel_threshold > 0:
            pred_np = np.where(conf_np < self.config.pixel_threshold, -1, pred_np)
        h, w = pred_np.shape
        labels = []
        for cid in np.unique(pred_np):
            if cid < 0 or int(cid) in self.background:
                continue
            m = np.asfortranarray((pred_np == cid).astype(np.uint8))
            rle = mask_utils.encode(m)
            labels.append(Label(
                kind="mask", score=float(conf_np[m.astype(bool)].mean()),
                bbox=tuple(float(v) for v in mask_utils.toBbox(rle)), class_name=self.vocabulary[int(cid)],
                class_id=int(cid), area=float(mask_utils.area(rle)),
                rle={"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")},
            ))
        return labels
