"""The Ray Data side of student training: decode, targets and augmentation (numpy, no torch).

These classes run in Ray Data's ``map_batches`` actors beside the trainer.
They import no torch (``tests/test_engine.py`` checks), so each such actor
starts without torch's import time and memory.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from labelmill.training.augment import Augment
from labelmill.training.targets import IGNORE, class_map, grounding_target, mark_gold


class _Data:
    """The ``data`` section as the driver validated it (``DataSection.model_dump``): these actors
    take plain values, so they import neither the config models nor, through them, torch."""

    def __init__(self, data: dict):
        self.image_size = int(data["image_size"])
        self.scale = tuple(data["scale"])
        self.hflip, self.augment = bool(data["hflip"]), bool(data["augment"])
        self.threshold = float(data["threshold"])
        self.max_image_pixels = int(data["max_image_pixels"])
        self.img_scale = tuple(data["img_scale"]) if data.get("img_scale") else None
        self.photometric = bool(data.get("photometric", False))
        self.pad_value = tuple(int(v) for v in data.get("pad_value", (0, 0, 0)))
        self.cat_max_ratio = data.get("cat_max_ratio")
        self.min_size = tuple(int(v) for v in data["min_size"]) if data.get("min_size") else None
        self.max_size = int(data["max_size"]) if data.get("max_size") else 1 << 30

    def augmenter(self) -> Augment:
        return Augment(self.image_size, self.scale, self.hflip, self.augment, img_scale=self.img_scale,
                       photometric=self.photometric, pad_value=self.pad_value, cat_max_ratio=self.cat_max_ratio)


class PrepareSegmentation:
    """map_batches: image bytes + mask rows -> augmented (image, class map) crops."""

    def __init__(self, data: dict, mapping: dict[int, int], vocabulary: list[str],
                 seen_classes: list[str] | None = None):
        self.data = _Data(data)
        self.aug = self.data.augmenter()
        self.mapping = {int(k): v for k, v in mapping.items()}
        self.seen = None
        if seen_classes is not None:  # transductive zero-shot
            self.seen = {vocabulary.index(n) for n in seen_classes}
            self.index = {n: i for i, n in enumerate(vocabulary)}
        self.rng = np.random.default_rng()

    def target(self, rows: list[dict], meta_json: str, h: int, w: int) -> np.ndarray:
        tgt = class_map(rows, h, w, self.data.threshold, self.mapping)
        if self.seen is None:
            return tgt
        # transductive zero-shot (MaskCLIP+): the teacher labels the unseen classes; a pixel the teacher gave a
        # seen class has no unseen label it could take (its argmax over the unseen classes is not stored), so it
        # stays unlabelled; seen-class gold is painted on top, marked as gold (self-training keeps it)
        tgt[np.isin(tgt, list(self.seen))] = IGNORE
        anns = (json.loads(meta_json) if meta_json else {}).get("annotations", [])
        gold = [{"class_id": self.index[a["category"]], "score": 1.0, "segmentation": a["segmentation"]}
                for a in anns if self.index.get(a.get("category")) in self.seen and a.get("segmentation")]
        gold_map = class_map(gold, h, w)
        painted = gold_map != IGNORE
        tgt[painted] = mark_gold(gold_map[painted])
        return tgt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from labelmill.io.images import decode_image
        from labelmill.schemas.records import ImageRequest

        big = ImageRequest(short_side=1 << 30, max_long_side=1 << 30)
        images, targets = [], []
        for data, labels, meta in zip(batch["image_bytes"], batch["labels_json"], batch["meta_json"]):
            img = decode_image(bytes(data), big, self.data.max_image_pixels).pixels
            tgt = self.target(json.loads(labels), meta, *img.shape[:2])
            a, b = self.aug.segmentation(img, tgt, self.rng)
            images.append(a)
            targets.append(b.astype(np.int16))
        return {"image": np.stack(images), "target": np.stack(targets)}


class PrepareGrounding:
    """map_batches: image bytes + box rows (or gold records) -> augmented image, caption, boxes, spans.

    With ``data.min_size`` (GLIP's recipe) images keep their own resized shapes (the trainer pads each batch
    with the mean colour); otherwise they are square crops.  ``packable`` marks caption-mode pseudo-labels,
    whose prompts the trainer packs with other captions as negatives (GLIP's caption data; gold is not)."""

    def __init__(self, data: dict, negatives: list[str] | None = None, max_classes: int = 85, pack: bool = True):
        self.data = _Data(data)
        self.aug = self.data.augmenter()
        self.rng = np.random.default_rng()
        self.negatives = list(negatives or [])  # vocabulary-mode prompts: absent classes to name (GLIP)
        self.max_classes = max_classes
        self.pack = pack

    def augment(self, img: np.ndarray, boxes: np.ndarray):
        if self.data.min_size is not None:
            out, b = self.aug.boxes_resized(img, boxes, self.rng, self.data.min_size, self.data.max_size)
            return out, b, np.arange(len(b))
        return self.aug.boxes(img, boxes, self.rng)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from labelmill.io.images import decode_image
        from labelmill.schemas.records import ImageRequest

        big = ImageRequest(short_side=1 << 30, max_long_side=1 << 30)
        out: dict[str, list] = {"image": [], "caption": [], "boxes_json": [], "spans_json": [], "packable": []}
        for data, labels in zip(batch["image_bytes"], batch["labels_json"]):
            target = grounding_target(json.loads(labels), self.data.threshold, self.negatives, self.max_classes,
                                      self.rng)
            if target is None:
                continue  # no box at the threshold: the image teaches nothing
            img = decode_image(bytes(data), big, self.data.max_image_pixels).pixels
            image, boxes, keep = self.augment(img, target.boxes)
            if len(keep) == 0:
                continue
            out["image"].append(image)
            out["caption"].append(target.caption)
            out["boxes_json"].append(json.dumps(boxes.tolist()))
            out["spans_json"].append(json.dumps([target.tokens_positive[i] for i in keep]))
            out["packable"].append(self.pack and target.from_caption)
        return {"image": ragged(out["image"]), **{k: np.array(v, bool if k == "packable" else object)
                                    for k, v in out.items() if k != "image"}}


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of images whose shapes may differ (multi-scale): numpy would stack equal shapes."""
    out = np.empty(len(arrays), object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def read_image(row: dict) -> dict:
    with open(row["path"], "rb") as fh:
        return {"image_bytes": fh.read(), "labels_json": row["labels_json"]}
