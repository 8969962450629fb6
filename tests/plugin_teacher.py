"""A teacher defined outside labelmill, loaded by class path from a run config.

It replays ground truth stored in each sample's ``.json`` member
(``{"annotations": [{"category": name, "category_id": id, "segmentation": RLE}]}``),
which makes exact checks of the pipeline and the COCO export possible.
"""

from __future__ import annotations

from pycocotools import mask as mask_utils

from labelmill.schemas.records import Label, Provenance, TeacherOutput
from labelmill.teachers.base import ImageRequest, Teacher, TeacherConfig


class GroundTruthConfig(TeacherConfig):
    score: float = 1.0
    fail_on_key: str | None = None
    delay_s: float = 0.0  # per batch, to make runs slow enough to interrupt
    trace_dir: str | None = None  # each instance leaves a file naming its process and Ray node

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=64, max_long_side=128)


class GroundTruthTeacher(Teacher):
    Config = GroundTruthConfig

    def __init__(self, config, device, allow_random_init=False):
        super().__init__(config, device, allow_random_init)
        if config.trace_dir:
            import os

            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "no-ray"
            gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []
            with open(os.path.join(config.trace_dir, f"{os.getpid()}-{node}"), "w") as fh:
                fh.write(",".join(gpus))

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, "ground-truth", "0" * 64, self.config_hash())

    def predict(self, batch, upstream):
        import time

        time.sleep(self.config.delay_s)
        outs = []
        for key, meta, (h, w) in zip(batch.keys, batch.metas, batch.orig_hw):
            if key == self.config.fail_on_key:
                raise RuntimeError(f"cannot label {key}")
            labels = []
            for ann in meta.get("annotations", []):
                rle = dict(ann["segmentation"])
                if isinstance(rle["counts"], list):
                    rle = mask_utils.frPyObjects(rle, h, w)
                    rle["counts"] = rle["counts"].decode()
                enc = {"size": rle["size"], "counts": rle["counts"].encode()}
                labels.append(Label(kind="mask", score=self.config.score,
                                    bbox=tuple(float(v) for v in mask_utils.toBbox(enc)),
                                    class_name=ann["category"], class_id=ann["category_id"],
                                    area=float(mask_utils.area(enc)), rle={"size": list(rle["size"]),
                                                                           "counts": rle["counts"]}))
            outs.append(TeacherOutput(labels=labels))
        return outs


class ProbeConfig(TeacherConfig):
    """Reports what the label stage handed it: a digest of each image's pixels."""

    short_side: int = 64
    max_long_side: int = 128
    fail_on_key: str | None = None

    def image_request(self) -> ImageRequest:
        return ImageRequest(short_side=self.short_side, max_long_side=self.max_long_side)


class ProbeTeacher(Teacher):
    """One box per image whose class name is the sha1 of its working pixels (host or device)."""

    Config = ProbeConfig

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.config.type, "probe", "0" * 64, self.config_hash())

    def predict(self, batch, upstream):
        import hashlib

        outs = []
        for i, key in enumerate(batch.keys):
            if key == self.config.fail_on_key:
                raise RuntimeError(f"cannot label {key}")
            pixels = batch.image(i).cpu().numpy()
            digest = hashlib.sha1(pixels.tobytes()).hexdigest()
            h, w = batch.work_hw[i]
            oh, ow = batch.orig_hw[i]
            outs.append(TeacherOutput(labels=[Label(kind="box", score=1.0, bbox=(0.0, 0.0, float(w), float(h)),
                                                    class_name=digest, area=float(oh * ow))]))
        return outs
