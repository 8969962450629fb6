"""MaskCLIP+ training: DeepLab student, text-embedding classifier, self-training, transductive option."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labelmill.models.deeplab import (
    SegStudent, StudentCheckpointError, StudentSpec, load_tensors, normalization_for, read_spec, save_student,
)
from labelmill.training.config import MaskCLIPPlusConfig
from labelmill.training.errors import CheckpointError, NoUsableLabels, VocabularyMismatch, readable_or_raise
from labelmill.training.data import teacher_section
from labelmill.training.targets import IGNORE, split_gold

KIND = "mask"


# ------------------------------------------------------------------ driver side
def checkpoint_classifier(path: str) -> tuple[list[str], torch.Tensor, StudentSpec]:
    try:
        spec, model_file = read_spec(path)
        state = load_tensors(model_file)
    except StudentCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    return list(spec.vocabulary), state["classifier.weight"][:, :, 0, 0].float(), spec


def text_embeddings(cfg: MaskCLIPPlusConfig, teacher: str) -> tuple[list[str], torch.Tensor]:
    """Vocabulary and (C, D) prompt-ensemble text embeddings the classifier starts from."""
    import pyarrow.parquet as pq

    from labelmill.store.regions import text_embeddings_table
    from labelmill.teachers.vocab import load_vocabulary

    if cfg.model.text_embeddings:
        table = pq.read_table(cfg.model.text_embeddings, columns=["class_name", "embedding"])
        emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
        return table.column("class_name").to_pylist(), torch.from_numpy(emb)
    if cfg.model.init_from:
        names, emb, _ = checkpoint_classifier(cfg.model.init_from)
        return names, emb
    section, random_ok = teacher_section(cfg.data.output, cfg.data.storage_options, teacher)
    if section.get("type") == "student":
        names, emb, _ = checkpoint_classifier(section["checkpoint"])
        return names, emb
    if section.get("type") != "maskclip":
        raise NoUsableLabels(f"teacher {teacher!r} is a {section.get('type')!r} teacher; MaskCLIP+ learns from maskclip masks")
    vocab = section.get("vocabulary", "coco-stuff-171")
    table = text_embeddings_table(
        section.get("model", "ViT-B-16"), section.get("pretrained"), vocab, section.get("templates", "maskclip85"),
        arch_config=section.get("arch_config"), allow_random_init=random_ok and section.get("pretrained") is None,
        cache_dir=section.get("cache_dir"),
    )
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    return load_vocabulary(vocab).names if not isinstance(vocab, list) else list(vocab), torch.from_numpy(emb)


def class_mapping(stored: dict[int, str], vocabulary: list[str]) -> dict[int, int]:
    """Stored class id -> student class id; refuses labels whose class the student lacks or renumbers."""
    index = {n: i for i, n in enumerate(vocabulary)}
    missing = sorted({n for n in stored.values() if n not in index})
    if missing:
        raise VocabularyMismatch(f"the labels name classes the student vocabulary lacks: {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} ({len(vocabulary)} student classes)")
    return {cid: index[name] for cid, name in stored.items()}


# ------------------------------------------------------------- worker side
class SegTask:
    """What the Ray Train loop needs to train a MaskCLIP+ student."""

    def __init__(self, cfg: dict, extra: dict):
        self.cfg = MaskCLIPPlusConfig.model_validate(cfg)
        self.vocabulary = extra["vocabulary"]
        self.embeddings = torch.tensor(extra["embeddings"], dtype=torch.float32)
        self.provenance = extra.get("provenance", {})
        seen = set(self.cfg.transductive.seen_classes) if self.cfg.transductive is not None else set()
        # the classes self-training may assign: the unseen ones in transductive training, else all (None)
        self.unseen = [i for i, n in enumerate(self.vocabulary) if n not in seen] if seen else None

    def build_model(self) -> SegStudent:
        m = self.cfg.model
        spec = StudentSpec(backbone=m.backbone, vocabulary=list(self.vocabulary),
                           embed_dim=m.embed_dim or self.embeddings.shape[1], logit_scale=m.logit_scale,
                           freeze_classifier=m.freeze_classifier, extra=dict(self.provenance), logits=m.logits,
                           normalization=normalization_for(m.backbone))
        emb = self.embeddings
        if spec.embed_dim != emb.shape[1]:
            raise ValueError(f"model.embed_dim {spec.embed_dim} differs from the text embeddings' {emb.shape[1]}")
        model = SegStudent(spec, emb, backbone_weights=m.backbone_weights)
        if m.init_from:
            _, model_file = read_spec(m.init_from)
            state = load_tensors(model_file)
            state.pop("classifier.weight", None)  # the classifier comes from the embeddings above
            model.load_state_dict(state, strict=False)
        return model

    def param_groups(self, model) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def inputs(self, batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
        return {"image": torch.as_tensor(batch["image"]).to(device),
                "target": torch.as_tensor(batch["target"]).long().to(device)}

    def batch_len(self, inputs: dict[str, torch.Tensor]) -> int:
        return int(inputs["image"].shape[0])

    def loss(self, model, inputs: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        target, gold = split_gold(inputs["target"])
        logits = model(inputs["image"])
        terms: dict[str, float] = {}
        st = self.cfg.self_training
        if st.start_step is not None and step >= st.start_step:
            target = self_training_target(logits.detach(), target, gold, self.unseen, st.threshold)
            terms["self_training"] = 1.0
        valid = target != IGNORE
        if not bool(valid.any()):
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
        with torch.no_grad():
            acc = ((logits.argmax(1) == target) & valid).sum().float() / valid.sum().clamp_min(1)
        terms.update({"loss_ce": float(loss.detach()), "pixel_acc": float(acc)})
        return loss, terms

    def save(self, model, folder: str) -> None:
        save_student(model, folder)

    def load(self, model, folder: str) -> None:
        import os

        from labelmill.models.deeplab import MODEL_FILE

        model.load_state_dict(load_tensors(os.path.join(folder, MODEL_FILE)))


def self_training_target(logits: torch.Tensor, target: torch.Tensor, gold: torch.Tensor,
                         unseen: list[int] | None, threshold: float = 0.0) -> torch.Tensor:
    """MaskCLIP+'s self-training targets: every pixel without ground truth takes the argmax of this training
    pass's (detached) logits over the unseen classes (all classes without a seen/unseen split); gold pixels
    keep their class.  ``threshold`` > 0 (not in the paper) leaves pixels whose softmax over those classes
    is less confident unlabelled."""
    scores = logits.float()
    if unseen is not None:
        index = torch.as_tensor(unseen, device=scores.device)
        scores = scores.index_select(1, index)
    conf, arg = scores.softmax(1).max(1)
    pred = index[arg] if unseen is not None else arg
    if threshold > 0:
        pred = torch.where(conf >= threshold, pred, torch.full_like(pred, IGNORE))
    return torch.where(gold, target, pred)


def predict_labels(model: SegStudent, image: np.ndarray, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Class map and confidence (H, W) of one uint8 (H, W, 3) image at its own size."""
    x = torch.from_numpy(np.array(image, copy=True))[None].to(device)
    with torch.no_grad():
        probs = model(x).float().softmax(1)[0]
    conf, pred = probs.max(0)
    return pred.cpu().numpy(), conf.cpu().numpy()


def data_section(cfg: MaskCLIPPlusConfig) -> dict:
    """The data section for the prepare actors, with the padding colour: the mean of the student's input
    normalisation (0 after normalising, as at inference) for ``pad: mean``, else black."""
    from labelmill.models.deeplab import NORMALIZATION

    data = cfg.data.model_dump(mode="json")
    mean = NORMALIZATION[normalization_for(cfg.model.backbone)][0]
    data["pad_value"] = [round(255 * m) for m in mean] if cfg.data.pad == "mean" else [0, 0, 0]
    return data


def prepare(cfg: MaskCLIPPlusConfig) -> tuple[dict, dict]:
    """Driver side: pin the version, check labels and vocabulary, build the streamed dataset."""
    import ray.data

    from labelmill.training.data import open_version, passes, sample_dataset, summarise_labels, version_shards
    from labelmill.training.prepare import PrepareSegmentation

    if cfg.model.backbone_weights:
        readable_or_raise(cfg.model.backbone_weights)
    ds = open_version(cfg.data)
    summary = summarise_labels(ds, KIND, cfg.data.teacher, cfg.data.threshold)
    vocabulary, emb = text_embeddings(cfg, summary.teacher)
    mapping = class_mapping(summary.classes, vocabulary)
    if cfg.transductive is not None:
        unknown = [c for c in cfg.transductive.seen_classes if c not in vocabulary]
        if unknown:
            raise VocabularyMismatch(f"transductive.seen_classes {unknown} are not in the vocabulary")
        taught = sorted(set(summary.classes.values()) & set(cfg.transductive.seen_classes))
        if taught:
            import sys

            print(f"[labelmill] transductive: the teacher labelled seen classes {taught[:5]}"
                  f"{' ...' if len(taught) > 5 else ''}; those pixels stay unlabelled (their best unseen class is "
                  "not stored). MaskCLIP+'s labels there: label the shards with the unseen classes as the "
                  "teacher's vocabulary and give model.text_embeddings for all classes", file=sys.stderr)
    if cfg.model.init_from:
        names, _, _ = checkpoint_classifier(cfg.model.init_from)
        if names != vocabulary:
            raise VocabularyMismatch(f"model.init_from has {len(names)} classes that differ from the "
                                     f"teacher's {len(vocabulary)}")
    repeat = passes(cfg.data, cfg.optim, cfg.scaling, summary.images, len(version_shards(ds)))
    samples = sample_dataset(ds, cfg.data, summary.teacher, KIND, repeat)
    seen = cfg.transductive.seen_classes if cfg.transductive is not None else None
    train = samples.map_batches(PrepareSegmentation,
                                fn_constructor_args=(data_section(cfg), mapping, vocabulary, seen),
                                batch_size=8, compute=ray.data.ActorPoolStrategy(size=cfg.data.prepare_workers),
                                num_cpus=cfg.data.prepare_cpus)
    extra = {"vocabulary": vocabulary, "embeddings": emb.tolist(),
             "provenance": {"output": ds.output, "version": ds.version, "teacher": summary.teacher,
                            "labels": summary.rows}}
    return {"train": train}, extra
