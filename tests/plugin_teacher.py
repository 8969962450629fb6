"""A teacher defined outside labelmill, loaded by class path from a run config.

It replays ground truth stored in each sample's ``.json`` member
(``{"annotations": [{"category": name, "category_id": id, "segmentation": ...}]}``),
which makes exact checks of the pipeline and the COCO export possible.  The
segmentation may be any COCO form: an RLE (compressed or uncompressed) or
polygons (a list of ``[x1, y1, x2, y2, ...]``).  A given ``bbox`` is kept
as is (COCO boxes bound the polygon, not its rasterised mask), else the box
of the mask; ``iscrowd`` is carried to the label.
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
    vocabulary: list[str] | None = None  # registered with the output (stable class ids), when given
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
            for n, ann in enumerate(meta.get("annotations", [])):
                score = float(ann.get("score", self.config.score))
                if score < self.config.min_score:
                    continue
                rle = _coco_rle(ann.get("segmentation"), h, w, f"{key}: annotation {n}")
                bbox = ann.get("bbox")
                labels.append(Label(kind="mask", score=score,
                                    bbox=tuple(float(v) for v in (bbox if bbox is not None else mask_utils.toBbox(rle))),
                                    class_name=ann["category"], class_id=ann["category_id"],
                                    area=float(mask_utils.area(rle)), iscrowd=bool(ann.get("iscrowd", 0)),
                                    rle={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}))
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


def _coco_rle(segmentation, h: int, w: int, where: str) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE with bytes counts."""
    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                       for p in segmentation):
            raise ValueError(f"{where}: polygons must be lists of at least 3 (x, y) pairs")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation):
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, h, w)
        counts = segmentation["counts"]
        return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"{where}: segmentation must be COCO polygons or an RLE with size and counts, "
                     f"got {type(segmentation).__name__}")
