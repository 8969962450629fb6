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
    min_score: float = 0.0  # a teacher threshold: annotations whose "score" (default ``score``) is below are not output

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
                if float(ann.get("score", self.config.score)) < self.config.min_score:
                    continue
                rle = dict(ann["segmentation"])
                if isinstance(rle["counts"], list):
                    rle = mask_utils.frPyObjects(rle, h, w)
                    rle["counts"] = rle["counts"].decode()
                enc = {"size": rle["size"], "counts": rle["counts"].encode()}
                labels.append(Label(kind="mask", score=float(ann.get("score", self.config.score)),
                                    bbox=tuple(float(v) for v in mask_utils.toBbox(enc)),
                                    class_name=ann["category"], class_id=ann["category_id"],
                                    area=float(mask_utils.area(enc)), rle={"size": list(rle["size"]),
                                                                           "counts": rle["counts"]}))
            outs.append(TeacherOutput(labels=labels))
        return outs
