"""Exports loaded by the real clients, each in its own virtual environment (a manual check; see BENCHMARKS.md).

    python benchmarks/check_export_clients.py make DIR            # labelmill's venv: label, then export
    /tmp/venv-ultralytics/bin/python benchmarks/check_export_clients.py ultralytics DIR
    /tmp/venv-fiftyone/bin/python benchmarks/check_export_clients.py fiftyone DIR

``make`` labels 16 photos (coco128 when ``../shared/data/coco128`` exists, else the
demo's) with a tiny random-init GLIP twice, in vocabulary mode (class labels)
and caption mode (grounded phrases), and writes export-yolo (detect),
export-fiftyone and export-odvg (both modes) under DIR.  The client modes
import only their client and print what it loaded.
"""

from __future__ import annotations

import json
import os
import sys


def make(root: str) -> None:
    from labelmill.cli import main
    from labelmill.config import load_config
    from labelmill.io.shards import write_shard
    from labelmill.pipelines.label import run

    coco = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco128", "images")
    photos = []
    if os.path.isdir(coco):
        for dirpath, _, files in os.walk(coco):
            photos += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".jpg")]
    if not photos:  # the demo's photos: scikit-image's bundled ones
        from importlib import resources

        folder = resources.files("skimage").joinpath("data")
        photos = [str(p) for p in folder.iterdir() if str(p).endswith((".jpg", ".png"))]
    photos = sorted(photos)[:16]
    samples = []
    for p in photos:
        key, ext = os.path.splitext(os.path.basename(p))
        with open(p, "rb") as fh:
            samples.append((key, {ext[1:]: fh.read(), "txt": b"a person with a dog near a car"}))
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    write_shard(os.path.join(root, "shards", "s-00000.tar"), samples)
    glip = {"type": "glip", "architecture": "tiny", "tokenizer": "builtin-test", "min_size": 320, "max_size": 512,
            "score_floor": 0.0, "pre_nms_thresh": 0.0, "max_detections_per_image": 5}
    for name, extra in (("vocab", {"mode": "vocabulary", "vocabulary": ["person", "dog", "car"]}), ("caption", {})):
        cfg = {"input": {"shards": os.path.join(root, "shards")}, "output": {"path": os.path.join(root, name)},
               "teachers": [dict(glip, **extra)], "allow_random_init": True, "progress_interval_s": 60}
        run(load_config(cfg))
    out = {"vocab": os.path.join(root, "vocab"), "caption": os.path.join(root, "caption")}
    assert main(["export-yolo", out["vocab"], os.path.join(root, "yolo"), "--overwrite", "--val-fraction", "0.25"]) == 0
    assert main(["export-fiftyone", out["caption"], os.path.join(root, "fo-caption"), "--overwrite"]) == 0
    assert main(["export-fiftyone", out["vocab"], os.path.join(root, "fo-vocab"), "--overwrite"]) == 0
    assert main(["export-odvg", out["caption"], os.path.join(root, "odvg-vg"), "--overwrite"]) == 0
    assert main(["export-odvg", out["vocab"], os.path.join(root, "odvg-od"), "--overwrite"]) == 0


def ultralytics(root: str) -> None:
    from ultralytics import YOLO
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(os.path.join(root, "yolo", "data.yaml"))
    print("check_det_dataset:", {k: data[k] for k in ("nc", "names", "train", "val")})
    model = YOLO("yolov8n.yaml")  # built from the architecture: no weights to download
    model.train(data=os.path.join(root, "yolo", "data.yaml"), epochs=1, imgsz=320, batch=4, device="cpu",
                plots=False, amp=False, workers=0, project=os.path.join(root, "ul-runs"), name="one", exist_ok=True,
                val=True)
    print("trained one epoch of yolov8n")


def fiftyone(root: str) -> None:
    """FiftyOne's COCODetectionDatasetImporter: what ``Dataset.from_dir(dataset_type=COCODetectionDataset)`` runs
    (from_dir itself needs FiftyOne's MongoDB, which its wheel could not start on this VM)."""
    import fiftyone.utils.coco as fouc

    for name in ("fo-caption", "fo-vocab"):
        manifest = json.load(open(os.path.join(root, name, "manifest.json")))
        importer = fouc.COCODetectionDatasetImporter(data_path=os.path.join(root, name, "data"),
                                                     labels_path=os.path.join(root, name, manifest["labels"]["glip"]),
                                                     label_types=["detections"])
        samples = dets = 0
        first = None
        with importer:
            for path, meta, labels in importer:
                assert os.path.isfile(path)
                samples += 1
                found = labels.detections if labels is not None else []
                dets += len(found)
                first = first or (found[0] if found else None)
        print(name, "samples", samples, "detections", dets, "first:",
              None if first is None else {"label": first.label, "confidence": round(first.confidence, 4),
                                          "phrase": first["phrase"] if first.has_field("phrase") else None})


if __name__ == "__main__":
    {"make": make, "ultralytics": ultralytics, "fiftyone": fiftyone}[sys.argv[1]](os.path.abspath(sys.argv[2]))
