"""GLIP self-training: a GLIP student (Swin-L by default) on a version's GLIP-T pseudo-labels mixed with gold data.

Pseudo-labels are the ``box`` rows of a ``glip`` teacher (caption mode:
caption, phrase, ``tokens_positive``; vocabulary mode: a ``"a. b. "``
caption is rebuilt).  Gold grounding data (ODVG JSONL or MDETR/COCO JSON
with ``tokens_positive``) is streamed as a second Ray dataset; each batch
takes ``round(gold_ratio * batch_size)`` samples from it.  The trained
weights are written with official key names (``model.safetensors``) so a
``glip`` teacher loads them as they are (``weights: .../model.safetensors``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from labelmill.training.config import GLIPTrainConfig
from labelmill.training.errors import CheckpointError, readable_or_raise
from labelmill.training.prepare import ragged

KIND = "box"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "glip.json"


#: Swin stochastic depth of GLIP's configs: configs/pretrain/glip_Swin_L.yaml sets 0.4, the default is 0.2
DROP_PATH = {"glip_l": 0.4, "glip_t": 0.2, "tiny": 0.2}


def glip_config(model_cfg, training: bool = True):
    """The student's GLIPConfig: the preset, its overrides and (``training``) GLIP's training regularisers."""
    from dataclasses import replace

    from labelmill.models.glip import GLIPConfig

    cfg = getattr(GLIPConfig, model_cfg.preset)().with_overrides(**model_cfg.overrides)
    if not training:
        return cfg
    rate = model_cfg.drop_path_rate if model_cfg.drop_path_rate is not None else DROP_PATH[model_cfg.preset]
    return cfg.with_overrides(swin=replace(cfg.swin, drop_path_rate=rate), fpn_drop_block_prob=model_cfg.fpn_drop_block,
                              fpn_drop_block_size=model_cfg.fpn_drop_block_size, fusion_dropout=model_cfg.fusion_dropout,
                              head_text_dropout=model_cfg.head_text_dropout)


def token_map(offsets: list[tuple[int, int]], spans_per_box: list[list[list[int]]], length: int) -> torch.Tensor:
    """Binary (boxes, length): the tokens whose characters overlap each box's spans."""
    out = torch.zeros(len(spans_per_box), length)
    for b, spans in enumerate(spans_per_box):
        for s, e in spans:
            for t, (ts, te) in enumerate(offsets[:length]):
                if te > ts and ts < e and te > s:
                    out[b, t] = 1.0
    return out


def gold_records(gold) -> list[dict]:
    """Gold grounding records -> rows shaped like pseudo-label rows (image bytes read lazily by path).

    MDETR/COCO ``bbox`` is ``[x, y, w, h]`` as stored; ODVG corners ``[x1, y1, x2, y2]`` are edges
    (``x2 = x + w``, as labelmill's ``export-odvg`` writes them), so both give the same training target."""
    fmt = gold.format or ("odvg" if gold.path.endswith((".jsonl", ".odvg")) else "mdetr")
    rows = []
    if fmt == "odvg":
        with open(gold.path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = json.loads(line)
                g = rec.get("grounding") or {}
                labels = [{"bbox": [r["bbox"][0], r["bbox"][1], r["bbox"][2] - r["bbox"][0], r["bbox"][3] - r["bbox"][1]],
                           "score": 1.0, "caption": g.get("caption"), "phrase": r.get("phrase"),
                           "tokens_positive": r.get("tokens_positive")} for r in g.get("regions", [])]
                rows.append({"path": os.path.join(gold.images, rec["filename"]), "labels_json": json.dumps(labels)})
    else:
        with open(gold.path) as fh:
            coco = json.load(fh)
        anns: dict[int, list] = {}
        for a in coco.get("annotations", []):
            anns.setdefault(a["image_id"], []).append(a)
        for img in coco.get("images", []):
            labels = [{"bbox": a["bbox"], "score": 1.0, "caption": img.get("caption"), "phrase": a.get("phrase"),
                       "tokens_positive": a.get("tokens_positive")} for a in anns.get(img["id"], [])]
            rows.append({"path": os.path.join(gold.images, img["file_name"]), "labels_json": json.dumps(labels)})
    return rows


def prompt_vocabulary(cfg: GLIPTrainConfig, teacher: str) -> list[str]:
    """The vocabulary-mode teacher's class names (the negatives its prompts may name); [] in caption mode."""
    from labelmill.teachers.vocab import load_vocabulary
    from labelmill.training.data import teacher_section as output_teacher_section
    from labelmill.training.errors import NoUsableLabels

    try:
        section, _ = output_teacher_section(cfg.data.output, cfg.data.storage_options, teacher)
    except NoUsableLabels:  # an output that records no config for the teacher: prompts name positives only
        return []
    if section.get("mode", "caption") != "vocabulary" or section.get("vocabulary") is None:
        return []
    return list(load_vocabulary(section["vocabulary"]).names)


def prepare(cfg: GLIPTrainConfig) -> tuple[dict, dict]:
    """Driver side: pin the version, check labels, build the pseudo-label (and gold) streams."""
    import ray.data

    from labelmill.training.data import open_version, passes, sample_dataset, summarise_labels, version_shards
    from labelmill.training.prepare import PrepareGrounding, read_image

    if not os.path.exists(cfg.model.tokenizer) and cfg.model.tokenizer != "builtin-test":
        raise CheckpointError(f"tokenizer folder {cfg.model.tokenizer} does not exist")
    if cfg.model.init_from and not os.path.isfile(cfg.model.init_from):
        raise CheckpointError(f"model.init_from {cfg.model.init_from} does not exist")
    if cfg.model.init_from:
        readable_or_raise(cfg.model.init_from)
    ds = open_version(cfg.data)
    summary = summarise_labels(ds, KIND, cfg.data.teacher, cfg.data.threshold)
    negatives = prompt_vocabulary(cfg, summary.teacher)
    data = cfg.data.model_dump(mode="json")
    # crops are padded with GLIP's mean colour (RGB of its BGR PIXEL_MEAN), multi-scale batches by the trainer
    data["pad_value"] = [round(v) for v in PIXEL_MEAN_BGR[::-1]] if cfg.data.pad == "mean" else [0, 0, 0]
    kwargs = dict(batch_size=8, compute=ray.data.ActorPoolStrategy(size=cfg.data.prepare_workers),
                  num_cpus=cfg.data.prepare_cpus)
    repeat = passes(cfg.data, cfg.optim, cfg.scaling, summary.images, len(version_shards(ds)))
    datasets = {"train": sample_dataset(ds, cfg.data, summary.teacher, KIND, repeat).map_batches(
        PrepareGrounding, fn_constructor_args=(data, negatives, cfg.max_prompt_classes, True), **kwargs)}
    gold_sets = [(g, gold_records(g)) for g in cfg.gold]
    ratio = gold_share(cfg.gold_ratio, [(len(rows), g.copies) for g, rows in gold_sets], summary.images)
    if ratio > 0:
        rows = [r for _, recs in gold_sets for r in recs]
        datasets["gold"] = gold_dataset(rows, ratio, cfg).map(read_image, num_cpus=cfg.data.read_cpus).map_batches(
            PrepareGrounding, fn_constructor_args=(data, [], cfg.max_prompt_classes, False), **kwargs)
    extra = {"provenance": {"output": ds.output, "version": ds.version, "teacher": summary.teacher,
                            "labels": summary.rows}, "gold_ratio": ratio, "gold_drawn": cfg.gold_ratio == "auto"}
    return datasets, extra


GOLD_CHUNK = 512  # gold records per object-store block of the gold stream


def gold_dataset(rows: list[dict], ratio: float, cfg: GLIPTrainConfig):
    """The gold stream: the records put in the object store once, in chunks, listed for enough shuffled
    passes to feed the whole run, so Ray Data starts it once (a restart per pass costs seconds each)."""
    import math

    import ray
    import ray.data

    from labelmill.training.data import MAX_AUTO_ITEMS, samples_needed

    needed = ratio * samples_needed(cfg.optim, cfg.scaling)
    chunks = [ray.put(rows[i : i + GOLD_CHUNK]) for i in range(0, len(rows), GOLD_CHUNK)]
    repeat = max(1, min(math.ceil(needed / max(1, len(rows))) + 1, MAX_AUTO_ITEMS // len(chunks)))
    rng = np.random.default_rng(cfg.optim.seed)
    items = [{"chunk": int(i)} for _ in range(repeat) for i in rng.permutation(len(chunks))]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200))).flat_map(
        _gold_rows, fn_kwargs={"chunks": chunks}, num_cpus=cfg.data.read_cpus)


def _gold_rows(item: dict, chunks: list) -> list[dict]:
    import ray

    return ray.get(chunks[item["chunk"]])


#: GLIP's INPUT.PIXEL_MEAN (BGR, 0-255), the colour every training image is padded with under the recipe
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)


def gold_share(gold_ratio, sets: list[tuple[int, int]], pseudo_images: int) -> float:
    """The share of training samples drawn from gold data.  ``auto`` is GLIP's rule (its datasets are
    concatenated, each ``copies`` times): gold sets weigh their size x copies against the pseudo-labelled
    images; a number is taken as it is; no gold set gives 0."""
    if not sets or not any(n for n, _ in sets):
        return 0.0
    if gold_ratio != "auto":
        return float(gold_ratio)
    gold = sum(n * copies for n, copies in sets)
    return gold / (gold + max(0, pseudo_images))


# ------------------------------------------------------------- worker side
class GroundingTask:
    def __init__(self, cfg: dict, extra: dict):
        from labelmill.teachers.glip import load_glip_tokenizer

        self.cfg = GLIPTrainConfig.model_validate(cfg)
        self.arch = glip_config(self.cfg.model)
        self.tokenizer = load_glip_tokenizer(self.cfg.model.tokenizer)
        self.provenance = extra.get("provenance", {})
        self.gold_ratio = float(extra.get("gold_ratio", 0.0))
        self.gold_drawn = bool(extra.get("gold_drawn", False))
        self.n_gold = round(self.gold_ratio * self.cfg.optim.batch_size)
        self.rng = np.random.default_rng([self.cfg.optim.seed, _rank()])
        self.recent: list[str] = []  # other captions seen on this worker: the pool packed prompts draw from
        self.gold_left: dict | None = None

    def gold_count(self, batch_len: int) -> int:
        """Gold samples in the next batch: drawn slot by slot under ``auto`` (the share holds on average at
        any batch size), else ``round(gold_ratio x batch_size)``."""
        if self.gold_drawn:
            return int(self.rng.binomial(batch_len, self.gold_ratio))
        return self.n_gold

    def build_model(self):
        from labelmill.models.glip import GLIP, load_glip_weights
        from labelmill.models.glip.checkpoint import CheckpointError as GLIPCheckpointError

        model = GLIP(self.arch)
        m = self.cfg.model
        if m.init_from:
            try:
                load_glip_weights(model, m.init_from, strict=False)
            except (GLIPCheckpointError, FileNotFoundError) as exc:
                raise CheckpointError(str(exc).splitlines()[0]) from None
        model.language_backbone.requires_grad_(not m.freeze_language)
        model.backbone.body.requires_grad_(not m.freeze_backbone)
        return model

    def param_groups(self, model) -> list[dict[str, Any]]:
        m = self.cfg.model
        lang = [p for p in model.language_backbone.parameters() if p.requires_grad]
        body = [p for p in model.backbone.body.parameters() if p.requires_grad]
        taken = {id(p) for p in lang + body}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest, "lr_scale": 1.0}, {"params": body, "lr_scale": m.backbone_lr_scale},
                {"params": lang, "lr_scale": m.language_lr_scale}]

    def mix_gold(self, batch: dict, gold_shard, gold_iter):
        """Replace the last :meth:`gold_count` samples of a batch with gold samples (restarting the gold
        stream)."""
        n_gold = min(self.gold_count(len(batch["caption"])), len(batch["caption"]))
        if n_gold <= 0:
            return batch, gold_iter
        need, parts = n_gold, []
        while need > 0:
            g, self.gold_left = self.gold_left, None  # what the last gold batch had left over comes first
            if g is None:
                if gold_iter is None:
                    gold_iter = iter(gold_shard.iter_batches(batch_size=max(1, self.n_gold, round(
                        self.gold_ratio * len(batch["caption"]))), batch_format="numpy"))
                g = next(gold_iter, None)
                if g is None:
                    gold_iter = None
                    continue
            take = min(need, len(g["caption"]))
            parts.append({k: v[:take] for k, v in g.items()})
            if take < len(g["caption"]):
                self.gold_left = {k: v[take:] for k, v in g.items()}
            need -= take
        keep = len(batch["caption"]) - n_gold
        mixed = {k: _concat([batch[k][:keep]] + [p[k] for p in parts]) for k in batch}
        return mixed, gold_iter

    def prompts(self, batch: dict) -> tuple[list[str], list]:
        """Captions and box spans of a batch; caption-mode pseudo-labels get other captions packed in as
        negatives (GLIP's caption data: none with ``negative_captions_none``, else all
        ``negative_captions`` with ``negative_captions_all``, else a number drawn below it), drawn from
        this worker's recent captions, never truncating the positive caption."""
        from labelmill.training.targets import pack_caption

        cfg = self.cfg
        captions = [str(c) for c in batch["caption"]]
        spans = [json.loads(s) for s in batch["spans_json"]]
        packable = batch.get("packable", np.zeros(len(captions), bool))
        pool = list(dict.fromkeys(self.recent + [c for c, p in zip(captions, packable) if p]))
        length = self._token_count
        for i, (caption, ok) in enumerate(zip(captions, packable)):
            if not ok or cfg.negative_captions == 0:
                continue
            others = [c for c in pool if c != caption]
            if self.rng.random() < cfg.negative_captions_none or not others:
                continue
            want = cfg.negative_captions if self.rng.random() < cfg.negative_captions_all else \
                int(self.rng.integers(cfg.negative_captions))
            picks = [others[j] for j in self.rng.integers(len(others), size=want)]
            captions[i], spans[i] = pack_caption(caption, spans[i], picks, self.arch.max_query_len, length, self.rng)
        self.recent = (self.recent + [c for c, p in zip(batch["caption"], packable) if p])[-256:]
        return captions, spans

    def _token_count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def inputs(self, batch: dict, device) -> dict[str, Any]:
        from labelmill.models.glip.loss import GroundingTargets

        mean = torch.tensor(self.arch.pixel_mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.arch.pixel_std, device=device).view(3, 1, 1)
        # BGR, 0-255, GLIP's normalisation; each image at the top left of a canvas that fits the batch, rounded
        # up to size_divisibility, padded with 0 after normalising (the mean colour), as inference pads
        shapes = [np.shape(im)[:2] for im in batch["image"]]
        div = max(1, self.arch.size_divisibility)
        h = -(-max(s[0] for s in shapes) // div) * div
        w = -(-max(s[1] for s in shapes) // div) * div
        images = torch.zeros(len(shapes), 3, h, w, device=device)
        for i, im in enumerate(batch["image"]):
            rgb = torch.as_tensor(np.ascontiguousarray(im)).to(device).permute(2, 0, 1).float()
            images[i, :, : rgb.shape[1], : rgb.shape[2]] = (rgb.flip(0) - mean) / std
        captions, spans_per_image = self.prompts(batch)
        enc = self.tokenizer(captions, padding="longest", truncation=True,
                             max_length=self.arch.max_query_len, return_offsets_mapping=True, return_tensors="pt")
        length = enc["input_ids"].shape[1]
        targets = []
        for offsets, boxes, spans in zip(enc["offset_mapping"].tolist(), batch["boxes_json"], spans_per_image):
            b = torch.tensor(json.loads(boxes), dtype=torch.float32).view(-1, 4)
            targets.append(GroundingTargets(b.to(device), token_map([tuple(o) for o in offsets], spans, length)))
        return {"images": images, "input_ids": enc["input_ids"].to(device),
                "attention_mask": enc["attention_mask"].to(device), "targets": targets}

    def batch_len(self, inputs) -> int:
        return int(inputs["images"].shape[0])

    def loss(self, model, inputs, step: int):
        from labelmill.models.glip.loss import LossWeights, glip_loss

        out = model(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
        lw = self.cfg.loss
        return glip_loss(out, inputs["targets"], inputs["attention_mask"],
                         LossWeights(lw.atss_topk, lw.focal_alpha, lw.focal_gamma, lw.box_weight, lw.centerness_weight),
                         max_query_len=self.arch.max_query_len)

    def save(self, model, folder: str) -> None:
        from labelmill.models.glip import save_glip_weights

        save_glip_weights(model, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, META_FILE), "w") as fh:
            json.dump({"preset": self.cfg.model.preset, "overrides": self.cfg.model.overrides,
                       "tokenizer": self.cfg.model.tokenizer, "dataset": self.provenance}, fh, indent=2)

    def load(self, model, folder: str) -> None:
        from labelmill.models.glip import load_glip_weights

        load_glip_weights(model, os.path.join(folder, WEIGHTS_FILE))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate that keeps a ragged column (an object array of images) ragged."""
    if any(p.dtype == object for p in parts):
        return ragged([x for p in parts for x in p])
    return np.concatenate(parts)


def teacher_section(checkpoint: str, **kw) -> dict:
    """The `glip` teacher config that relabels with a trained GLIP student."""
    with open(os.path.join(checkpoint, META_FILE)) as fh:
        meta = json.load(fh)
    if meta["overrides"]:
        raise CheckpointError("a student with architecture overrides cannot be a glip teacher (presets only)")
    return {"type": "glip", "architecture": meta["preset"], "weights": os.path.join(checkpoint, WEIGHTS_FILE),
            "tokenizer": meta["tokenizer"], **kw}


def evaluate_detection(checkpoint: str, ds, *, gt: str | None = None, teacher: str | None = None,
                       threshold: float = 0.0, max_images: int | None = None, tokenizer: str | None = None) -> dict:
    """COCO AP (pycocotools) of a GLIP student against COCO ground truth or the version's teacher boxes."""
    import pyarrow.compute as pc

    from labelmill.teachers.base import build_teacher, validate_teacher_config
    from labelmill.training.data import summarise_labels
    from labelmill.training.evaluate import coco_ap, iter_images

    section = teacher_section(checkpoint, mode="caption")
    if tokenizer:
        section["tokenizer"] = tokenizer
    glip = build_teacher(validate_teacher_config(section), torch.device("cpu"))
    summary = summarise_labels(ds, KIND, teacher, threshold)
    rows = ds.read("labels", columns=["shard", "key", "bbox", "score", "caption", "phrase", "tokens_positive"],
                   filter=(pc.field("teacher") == summary.teacher) & (pc.field("kind") == KIND)).to_pylist()
    by_key: dict = {}
    for r in rows:
        if (r["score"] or 0) >= threshold:
            by_key.setdefault((r["shard"], r["key"]), []).append(r)
    images, anns, dets = [], [], []
    from labelmill.models.glip import caption_prompt

    for n, (shard, key, image) in enumerate(iter_images(ds, set(by_key))):
        if max_images and n >= max_images:
            break
        ref = by_key[(shard, key)]
        images.append({"id": n + 1, "file_name": key, "height": image.shape[0], "width": image.shape[1]})
        for r in ref:
            anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": 1, "bbox": list(r["bbox"]),
                         "area": float(r["bbox"][2] * r["bbox"][3]), "iscrowd": 0})
        found = glip.predictor.predict([image], [caption_prompt(ref[0]["caption"] or "")])[0]
        for box, score in zip(found.boxes.tolist(), found.scores.tolist()):
            dets.append({"image_id": n + 1, "category_id": 1, "score": float(score),
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    gt_data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    out = coco_ap(gt_data, dets)
    out.update({"images": len(images), "reference": gt or f"teacher {summary.teacher} of version {ds.version}"})
    return out
