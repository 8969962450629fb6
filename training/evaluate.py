"""Evaluation: mIoU for segmentation students, COCO AP (pycocotools) for detection students.

The reference is either the dataset version's own teacher labels (how well
a student reproduces its teacher) or COCO-format ground truth whose images
are matched to samples by ``file_name`` = sample key.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from labelmill.training.targets import IGNORE, class_map


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    ok = target != IGNORE
    idx = target[ok].astype(np.int64) * num_classes + pred[ok].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> dict[str, Any]:
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if present.any() else 0.0,
            "pixel_accuracy": float(inter.sum() / max(conf.sum(), 1)),
            "iou_per_class": [None if np.isnan(v) else round(float(v), 5) for v in iou]}


def iter_images(ds, keys: set[tuple[str, str]] | None = None, storage_options: dict | None = None
                ) -> Iterator[tuple[str, str, np.ndarray]]:
    """(shard, key, RGB image at original size) for the samples of a version (or the given ones)."""
    import pyarrow.compute as pc

    from labelmill.io.images import decode_image
    from labelmill.io.shards import iter_shard
    from labelmill.schemas.records import ImageRequest

    shards = set()
    for batch in ds.iter_batches("samples", columns=["shard"]):
        shards.update(pc.unique(batch.column("shard")).to_pylist())
    big = ImageRequest(short_side=1 << 30, max_long_side=1 << 30)
    for shard in sorted(shards):
        for raw in iter_shard(shard, storage_options):
            if raw.image is None or raw.error or (keys is not None and (shard, raw.key) not in keys):
                continue
            yield shard, raw.key, decode_image(raw.image, big, 1 << 40).pixels


def segmentation_agreement(model, ds, teacher: str | None = None, threshold: float = 0.0,
                           max_images: int | None = None, device="cpu") -> dict[str, Any]:
    """mIoU and pixel agreement of a student with a version's teacher masks."""
    import pyarrow.compute as pc

    from labelmill.training.data import summarise_labels
    from labelmill.training.maskclip_plus import class_mapping

    summary = summarise_labels(ds, "mask", teacher, threshold)
    vocabulary = list(model.spec.vocabulary)
    mapping = class_mapping(summary.classes, vocabulary)
    rows = ds.read("labels", columns=["shard", "key", "class_id", "score", "segmentation"],
                   filter=(pc.field("teacher") == summary.teacher) & (pc.field("kind") == "mask")).to_pylist()
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["shard"], r["key"]), []).append(r)
    pairs = ((image, class_map(by_key[(shard, key)], *image.shape[:2], threshold=threshold, classes=mapping))
             for shard, key, image in iter_images(ds, set(by_key)))
    return _score(model, pairs, max_images, device, f"teacher {summary.teacher} of version {ds.version}")


def _score(model, pairs, max_images: int | None, device, reference: str) -> dict[str, Any]:
    """mIoU and pixel accuracy of the model's predictions over (image, target class map) pairs."""
    from labelmill.training.maskclip_plus import predict_labels

    k = len(model.spec.vocabulary)
    conf = np.zeros((k, k), np.int64)
    n = 0
    for image, target in pairs:
        pred, _ = predict_labels(model, image, device)
        conf += confusion(pred, target, k)
        n += 1
        if max_images and n >= max_images:
            break
    out = miou(conf)
    out.update({"images": n, "reference": reference})
    return out


def segmentation_gt(model, ds, gt_path: str, max_images: int | None = None, device="cpu") -> dict[str, Any]:
    """mIoU against COCO-format ground-truth masks (categories matched by name)."""
    from pycocotools.coco import COCO

    coco = COCO(gt_path)
    vocabulary = list(model.spec.vocabulary)
    index = {n: i for i, n in enumerate(vocabulary)}
    by_name = {img["file_name"]: img["id"] for img in coco.dataset["images"]}

    def pairs():
        for _, key, image in iter_images(ds):
            if key not in by_name:
                continue
            target = np.full(image.shape[:2], IGNORE, np.int64)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[by_name[key]])):
                cid = index.get(coco.cats[ann["category_id"]]["name"])
                if cid is not None:
                    target[coco.annToMask(ann).astype(bool)] = cid
            yield image, target

    return _score(model, pairs(), max_images, device, gt_path)


def coco_ap(gt: dict, detections: list[dict]) -> dict[str, float]:
    """COCO bbox AP / AP50 / AR100 of detections (``image_id, category_id, bbox xywh, score``)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AR100": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        d = g.loadRes(detections)
        ev = COCOeval(g, d, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AR100": float(ev.stats[8])}


def evaluate(checkpoint: str, output: str, *, version: int | None = None, gt: str | None = None,
             teacher: str | None = None, threshold: float = 0.0, max_images: int | None = None,
             tokenizer: str | None = None) -> dict[str, Any]:
    """``labelmill eval``: dispatch on the checkpoint's kind."""
    import labelmill.data
    from labelmill.models.deeplab import META_FILE, StudentCheckpointError, load_student
    from labelmill.training.errors import CheckpointError, NoUsableLabels

    try:
        ds = labelmill.data.open(output, version)
    except LookupError as exc:
        raise NoUsableLabels(str(exc)) from None
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    if os.path.isfile(os.path.join(folder, META_FILE)):
        try:
            model = load_student(checkpoint)
        except StudentCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
        if gt:
            return segmentation_gt(model, ds, gt, max_images)
        return segmentation_agreement(model, ds, teacher, threshold, max_images)
    from labelmill.training.glip import META_FILE as GLIP_META, evaluate_detection

    if not (os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, GLIP_META))):
        raise CheckpointError(f"{checkpoint} is not a student checkpoint: expected a folder holding {META_FILE} "
                              f"(MaskCLIP+) or {GLIP_META} (GLIP), as `labelmill train` writes")
    return evaluate_detection(checkpoint, ds, gt=gt, teacher=teacher, threshold=threshold,
                              max_images=max_images, tokenizer=tokenizer)
