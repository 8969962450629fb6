"""``labelmill demo``: the whole pipeline, offline, on photos a package ships.

1. Writes two WebDataset shards from scikit-image's bundled photos (public
   domain / CC0, see scikit-image's data README) with hand-written captions,
   plus one deliberately broken sample so the error path shows up.
2. Runs the labelling pipeline on an embedded local Ray with randomly
   initialised teachers (no weights can be downloaded offline).  A banner
   says so and every row records ``weights_sha256 = random-init``.
3. Exports COCO and writes ``report.html``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# file in skimage/data -> caption
DEMO_PHOTOS = {
    "astronaut.png": "An astronaut in a white spacesuit stands in front of an American flag.",
    "chelsea.png": "A tabby cat with green eyes looks to the side.",
    "coffee.png": "A cup of coffee on a saucer with a spoon on a wooden table.",
    "rocket.jpg": "A rocket on the launch pad under a blue sky with clouds.",
    "motorcycle_left.png": "A red motorcycle parked in a garage next to shelves.",
    "camera.png": "A man holding a camera on a tripod in a grassy field.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies in a deep space photograph.",
    "retina.jpg": "A close-up photograph of the retina of a human eye.",
    "coins.png": "Old coins arranged in rows on a dark background.",
    "moon.png": "The surface of the moon with craters.",
    "logo.png": "A logo with a snake drawn on a transparent background.",
    "grass.png": "A field of green grass seen from above.",
}

#: the demo's random-init GLIP: no score cut (its scores sit at the 0.01 prior; see demo_config), said in a banner
DEMO_GLIP_CUTS = {"score_floor": 0.0, "pre_nms_thresh": 0.0}
GLIP_BANNER = ("[labelmill] demo GLIP: random weights score every box about 0.01 (the prior of its classifier "
               "bias), so the demo keeps its 10 best boxes per image with no score cut (score_floor 0, "
               "pre_nms_thresh 0); real weights use 0.05")


def build_demo_shards(folder: str | os.PathLike) -> list[str]:
    """Write the demo shards; returns their paths."""
    from labelmill.io.shards import write_shard

    data = resources.files("skimage").joinpath("data")
    samples = []
    for i, (name, caption) in enumerate(DEMO_PHOTOS.items()):
        blob = data.joinpath(name).read_bytes()
        ext = name.rsplit(".", 1)[1]
        key = f"{i:04d}-{name.rsplit('.', 1)[0]}"
        samples.append((key, {ext: blob, "txt": caption.encode(), "json": f'{{"source": "skimage/{name}"}}'.encode()}))
    # a truncated JPEG: the pipeline must record it as an error, not abort
    broken = data.joinpath("rocket.jpg").read_bytes()[:2000]
    samples.append(("9999-broken", {"jpg": broken, "txt": b"A file cut short in transfer."}))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = len(samples) // 2
    paths = [str(folder / "demo-00000.tar"), str(folder / "demo-00001.tar")]
    write_shard(paths[0], samples[:half])
    write_shard(paths[1], samples[half:])
    return paths


def demo_config(out: str, teachers: list[str]) -> dict:
    sections = []
    for name in teachers:
        if name == "maskclip":
            sections.append(
                {
                    "type": "maskclip",
                    "model": "ViT-B-16",
                    "pretrained": None,
                    "vocabulary": "coco-stuff-171",
                    "templates": "short",
                    "image_size": 224,
                    # a trained CLIP's temperature; random weights with their own (about 14) give flat maps
                    "logit_scale": 100.0,
                }
            )
        elif name == "glip":
            # the real GLIP-T architecture, random weights, a small input size for CPU speed;
            # the offline demo cannot download bert-base-uncased, so it builds a small WordPiece vocab
            # GLIP's classification bias starts at its focal-loss prior (0.01), so random weights score every box
            # about 0.01: under the default cuts (0.05) nothing would be kept; the demo keeps the 10 best boxes
            sections.append({"type": "glip", "architecture": "glip_t", "weights": None, "tokenizer": "builtin-test",
                             "min_size": 320, "max_size": 512, "max_detections_per_image": 10,
                             **DEMO_GLIP_CUTS})
        elif name == "vild":
            earlier = [t for t in teachers[: teachers.index("vild")] if t in ("maskclip", "glip")]
            section = {"type": "vild", "pretrained": None, "whole_image": True,
                       "proposals": [{"teacher": t} for t in earlier] or [{"meta_field": "proposals"}]}
            if "maskclip" in earlier:
                # dense mode on the features MaskCLIP already computed: almost free
                section.update(model="ViT-B-16", mode="dense", dense_features_from="maskclip")
            else:
                # the ViLD/DetPro crop path; a small CLIP and few regions keep the demo quick on a CPU
                section.update(model="ViT-B-32", mode="crop", max_regions=8, work_short_side=448,
                               work_max_long_side=768)
            sections.append(section)
        else:
            raise ValueError(f"unknown demo teacher {name!r}: maskclip, glip, vild")
    return {
        "input": {"shards": os.path.join(out, "shards")},
        "output": {"path": os.path.join(out, "output"), "commit_every_shards": 1},
        "teachers": sections,
        "filter": {"min_score": 0.0, "min_area": 256, "max_labels_per_image": 12},
        "ray": {"batch_size": 8},
        "allow_random_init": True,
    }


def run_demo(out: str, teachers: list[str] | None = None, overrides: list[str] | None = None) -> dict:
    from labelmill.engine.progress import step
    from labelmill.export.coco import export_coco
    from labelmill.config import load_config
    from labelmill.pipelines.label import run
    from labelmill.export.report import write_report

    out = os.path.abspath(out)
    shards = build_demo_shards(os.path.join(out, "shards"))
    cfg = load_config(demo_config(out, teachers or ["maskclip"]), overrides)
    if any(t.type == "glip" for t in cfg.teachers):
        import sys

        print(GLIP_BANNER, file=sys.stderr)
    summary = run(cfg)
    with step("export coco"):
        coco = export_coco(cfg.output.path, os.path.join(out, "coco"), overwrite=True)  # a re-run refreshes it
    with step("report"):
        report = write_report(cfg.output.path, os.path.join(out, "report.html"))
    return {
        "shards": shards,
        "output": cfg.output.path,
        "coco": os.path.join(out, "coco"),
        "report": report,
        "summary": summary.as_dict(),
        "coco_files": coco["files"],
        "regions": os.path.join(cfg.output.path, "regions") if any(t.type == "vild" for t in cfg.teachers) else None,
        "note": "RANDOM WEIGHTS: labels demonstrate the pipeline, not a teacher's quality",
    }
