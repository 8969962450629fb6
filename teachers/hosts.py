"""Host sides of the built-in teachers: what runs in the CPU pools (no torch, no weights).

Each class turns its teacher's raw device results (a
:class:`~labelmill.schemas.raw.RawBatch`, see each ``RAW`` layout) into
:class:`~labelmill.schemas.records.TeacherOutput`\\ s in the ``finish`` stage,
and, for GLIP in caption mode, computes the per-image text inputs in the
``prepare`` stage. The device teachers (``teachers/maskclip.py`` ...) use the
same objects, so ``predict`` in one process and the three-stage pipeline give
the same labels.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from labelmill.schemas.raw import RawBatch
from labelmill.schemas.records import Label, RegionSet, TeacherOutput
from labelmill.teachers.base import FinishInfo, HostSide


def _outputs(raw: RawBatch, make) -> list[TeacherOutput | None]:
    return [make(i) if raw.valid[i] else None for i in range(len(raw))]


# ------------------------------------------------------------------ MaskCLIP
class MaskCLIPHost(HostSide):
    """MaskCLIP's masks from the label maps' runs and per-class statistics.

    RAW, per image: ``stats`` (1, 6, C+1) float64 (pixel count, summed
    confidence, x0, y0, x1, y1 per class; C = unlabelled), ``starts`` and
    ``values`` (the column-major runs of the label map), ``hw`` (1, 2) the
    label map's size (the original image's).
    """

    @cached_property
    def vocabulary(self):
        from labelmill.teachers.configs import VocabularyFile
        from labelmill.teachers.vocab import load_vocabulary

        spec = self.config.vocabulary
        return load_vocabulary(spec.model_dump() if isinstance(spec, VocabularyFile) else spec)

    @cached_property
    def background(self) -> set[int]:
        unknown = [b for b in self.config.background if b not in self.vocabulary.names]
        if unknown:
            raise ValueError(f"maskclip.background names {unknown} are not in the vocabulary")
        return {self.vocabulary.index(b) for b in self.config.background}

    def raw_fields(self) -> dict[str, tuple]:
        c = len(self.vocabulary)
        return {"stats": (np.float64, (6, c + 1)), "hw": (np.int64, (2,)), "starts": (np.int64, ()),
                "values": (np.int64, ())}

    def finish(self, raw: RawBatch, info: FinishInfo) -> list[TeacherOutput | None]:
        return _outputs(raw, lambda i: TeacherOutput(labels=self.encode(
            tuple(int(v) for v in raw.get("hw", i)[0]), raw.get("stats", i)[0], raw.get("starts", i),
            raw.get("values", i))))

    def present(self, stats: np.ndarray) -> list[int]:
        c = len(self.vocabulary)
        return [int(k) for k in np.nonzero(stats[0][:c])[0] if int(k) not in self.background]

    def encode(self, hw: tuple[int, int], stats: np.ndarray, starts: np.ndarray, values: np.ndarray) -> list[Label]:
        """Labels of the classes present in one label map: RLE from its runs, device-computed statistics."""
        from labelmill.teachers.rle import class_rles

        n, score, x0, y0, x1, y1 = stats
        present = self.present(stats)
        H, W = hw
        labels = []
        for k, counts in zip(present, class_rles(starts, values, hw, present)):
            labels.append(
                Label(
                    kind="mask",
                    score=float(score[k] / n[k]),
                    bbox=(float(x0[k]), float(y0[k]), float(x1[k] - x0[k] + 1), float(y1[k] - y0[k] + 1)),
                    class_name=self.vocabulary.names[k],
                    class_id=k,
                    area=float(n[k]),
                    rle={"size": [int(H), int(W)], "counts": counts.decode("ascii")},
                )
            )
        return labels

    def proposals(self, raw: RawBatch, i: int, orig_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The masks' boxes and scores, as the labels carry them (no RLE needed)."""
        n, score, x0, y0, x1, y1 = raw.get("stats", i)[0]
        boxes, scores = [], []
        for k in self.present(raw.get("stats", i)[0]):
            bx, by = float(x0[k]), float(y0[k])
            bw, bh = float(x1[k] - x0[k] + 1), float(y1[k] - y0[k] + 1)
            boxes.append([bx, by, bx + bw, by + bh])
            scores.append(float(score[k] / n[k]))
        return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(scores, dtype=np.float64)


# ---------------------------------------------------------------------- GLIP
def glip_box_to_xywh(box, sx: float, sy: float, width: int, height: int) -> tuple[float, float, float, float]:
    """A GLIP box (xyxy, inclusive pixel corners, at the working size) -> the stored COCO ``[x, y, w, h]`` in
    original pixels, ``w = x2 - x1 + 1`` (GLIP's convention; training rebuilds ``x2 = x + w - 1``)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x, y = max(0.0, x1 * sx), max(0.0, y1 * sy)
    return x, y, min(width, (x2 + 1) * sx) - x, min(height, (y2 + 1) * sy) - y


class GLIPHost(HostSide):
    """GLIP's grounded boxes; in caption mode also the prompts (noun phrases and tokens).

    PREPARED (caption mode), per image: the caption's phrases (text, spans),
    its BERT token ids and, per phrase span, the first and last token it
    covers (GLIP's positive map, built on the device from these).

    RAW, per image: ``dets`` (N, 6) float64 -- x1, y1, x2, y2 in the working
    image's pixels, score, phrase index -- and ``work_hw`` (1, 2).
    """

    def raw_fields(self) -> dict[str, tuple]:
        return {"dets": (np.float64, (6,)), "work_hw": (np.int64, (2,))}

    def prepared_type(self):
        import pyarrow as pa

        if self.config.mode != "caption":
            return None
        phrase = pa.struct([("text", pa.string()), ("spans", pa.list_(pa.list_(pa.int32())))])
        return pa.struct([("caption", pa.string()), ("phrases", pa.list_(phrase)),
                          ("input_ids", pa.list_(pa.int32())), ("token_ranges", pa.list_(pa.list_(pa.int32())))])

    @cached_property
    def tokenizer(self):
        from labelmill.teachers.glip import load_glip_tokenizer

        return load_glip_tokenizer(self.config.tokenizer)

    @cached_property
    def max_query_len(self) -> int:
        from labelmill.models.glip.config import GLIPConfig

        return getattr(GLIPConfig, self.config.architecture)().max_query_len

    @cached_property
    def vocabulary_chunks(self):
        """Vocabulary mode: the class list as prompt chunks (the same as the device teacher's)."""
        from labelmill.models.glip.text import vocabulary_prompts
        from labelmill.teachers.configs import VocabularyFile
        from labelmill.teachers.vocab import load_vocabulary

        spec = self.config.vocabulary
        vocab = load_vocabulary(spec.model_dump() if isinstance(spec, VocabularyFile) else spec)
        return list(vocab.names), vocabulary_prompts(list(vocab.names), self.tokenizer, self.max_query_len)

    def prepare(self, captions: list[str | None], metas: list[dict[str, Any]]) -> list[Any]:
        if self.config.mode != "caption":
            return [None] * len(captions)
        from labelmill.models.glip.text import caption_prompt, load_spacy

        nlp = load_spacy()
        out = []
        for caption in captions:
            if not caption:
                out.append(None)
                continue
            prompt = caption_prompt(caption, nlp)
            out.append(self.encode_prompt(prompt))
        return out

    def encode_prompt(self, prompt) -> dict[str, Any]:
        """The prepared row of one caption: its phrases, token ids and each span's token range."""
        from labelmill.models.glip.text import tokenize_prompt

        tok = tokenize_prompt(self.tokenizer, prompt, self.max_query_len)
        return {"caption": prompt.caption,
                "phrases": [{"text": ph.text, "spans": [list(s) for s in ph.spans]} for ph in prompt.phrases],
                "input_ids": list(tok.input_ids), "token_ranges": [list(r) for r in tok.ranges]}

    @staticmethod
    def tokenized(prepared: dict):
        """A prepared row as the predictor's :class:`~labelmill.models.glip.text.Tokenized` prompt."""
        from labelmill.models.glip.text import Tokenized

        return Tokenized(tuple(prepared["input_ids"]), tuple(tuple(r) for r in prepared["token_ranges"]),
                         tuple(ph["text"] for ph in prepared["phrases"]))

    def owners(self, prepared: dict | None) -> list[tuple[str, str, list]]:
        """Per phrase index: (caption it spans, phrase text, spans)."""
        if self.config.mode != "caption":
            _, chunks = self.vocabulary_chunks
            return [(chunk.caption, ph.text, [list(s) for s in ph.spans]) for chunk in chunks for ph in chunk.phrases]
        return [(prepared["caption"], ph["text"], ph["spans"]) for ph in prepared["phrases"]]

    def finish(self, raw: RawBatch, info: FinishInfo) -> list[TeacherOutput | None]:
        def one(i: int) -> TeacherOutput:
            prepared = info.prepared[i] if info.prepared is not None else None
            if self.config.mode == "caption" and not (prepared and prepared["phrases"]):
                return TeacherOutput(warnings=[f"teacher {self.name}: caption has no noun phrase"])
            wh = raw.get("work_hw", i)[0]
            return TeacherOutput(labels=self.labels(raw.get("dets", i), self.owners(prepared),
                                                    (int(wh[0]), int(wh[1])), info.orig_hw[i]))

        return _outputs(raw, one)

    def labels(self, dets: np.ndarray, owners, work_hw, orig_hw) -> list[Label]:
        oh, ow = orig_hw
        sy, sx = oh / work_hw[0], ow / work_hw[1]
        vocab = self.config.mode != "caption"
        names = self.vocabulary_chunks[0] if vocab else None
        boxes = dets[:, :4].astype(np.float32)
        scores = dets[:, 4].astype(np.float32)
        phrase_idx = dets[:, 5].astype(np.int64)
        labels = []
        for box, score, idx in zip(boxes, scores, phrase_idx):
            x, y, w, h = glip_box_to_xywh(box, sx, sy, ow, oh)
            if w <= 0 or h <= 0:
                continue
            caption, text, spans = owners[int(idx)]
            labels.append(
                Label(
                    kind="box",
                    score=float(score),
                    bbox=(x, y, w, h),
                    class_name=names[int(idx)] if vocab else text,
                    class_id=int(idx) if vocab else None,
                    area=w * h,
                    phrase=text,
                    tokens_positive=[tuple(s) for s in spans],
                    caption=caption,
                )
            )
        return labels

    def proposals(self, raw: RawBatch, i: int, orig_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and scores exactly as the labels carry them (phrase texts are not needed for that)."""
        wh = raw.get("work_hw", i)[0]
        dets = raw.get("dets", i)
        blank = [("", "", [])] * (int(dets[:, 5].max()) + 1 if len(dets) else 0)
        return TeacherOutput(labels=self.labels(dets, blank, (int(wh[0]), int(wh[1])), orig_hw)).proposal_boxes()


# ---------------------------------------------------------------------- ViLD
class ViLDHost(HostSide):
    """ViLD's region rows.

    RAW, per image: ``boxes`` (N, 4) float32 xyxy original pixels, ``scores``
    (N,) float32, ``sources`` (N,) int64 indices into :meth:`source_labels`,
    ``embeddings`` (N * D,) float16 (row-major), ``dim`` (1,) D,
    ``pixel_scale`` (1,) float64, ``dropped`` (1,) int64 proposals discarded
    as empty or too thin.
    """

    def raw_fields(self) -> dict[str, tuple]:
        return {"boxes": (np.float32, (4,)), "scores": (np.float32, ()), "sources": (np.int64, ()),
                "embeddings": (np.float16, ()), "dim": (np.int64, ()), "pixel_scale": (np.float64, ()),
                "dropped": (np.int64, ())}

    def source_labels(self) -> list[str]:
        from labelmill.teachers.configs import WHOLE_IMAGE

        return [src.label for src in self.config.proposals] + [WHOLE_IMAGE]

    def finish(self, raw: RawBatch, info: FinishInfo) -> list[TeacherOutput | None]:
        labels = self.source_labels()
        cfg = self.config

        def one(i: int) -> TeacherOutput:
            boxes = raw.get("boxes", i).astype(np.float32)
            emb = raw.get("embeddings", i)
            regions = RegionSet(
                boxes=boxes.reshape(-1, 4),
                scores=raw.get("scores", i).astype(np.float32),
                sources=[labels[int(s)] for s in raw.get("sources", i)],
                embeddings=emb.astype(np.float16).reshape(len(boxes), int(raw.get("dim", i)[0])),
                mode=cfg.mode,
                model=raw_model_name(cfg),
                pixel_scale=float(raw.get("pixel_scale", i)[0]),
            )
            dropped = int(raw.get("dropped", i)[0])
            warns = []
            if dropped:
                warns.append(f"{self.name}: {dropped} proposal(s) empty or thinner than min_box_size="
                             f"{cfg.min_box_size} px after clipping to the image, dropped")
            return TeacherOutput(regions=regions, warnings=warns)

        return _outputs(raw, one)


def raw_model_name(cfg) -> str:
    """The encoder name ViLD rows carry (an inline arch_config is named by its hash, as open_clip registers it)."""
    if cfg.arch_config is None:
        return cfg.model
    from labelmill.models.common import config_hash

    return f"labelmill-custom-{config_hash(cfg.arch_config)}"


# ---------------------------------------------------------------------- null
class NullHost(HostSide):
    """One whole-image box per image. RAW, per image: ``hw`` (1, 2) the original size."""

    def raw_fields(self) -> dict[str, tuple]:
        return {"hw": (np.int64, (2,))}

    def finish(self, raw: RawBatch, info: FinishInfo) -> list[TeacherOutput | None]:
        def one(i: int) -> TeacherOutput:
            h, w = (float(v) for v in raw.get("hw", i)[0])
            return TeacherOutput(labels=[Label(kind="box", score=1.0, bbox=(0.0, 0.0, w, h), class_name="image",
                                               area=float(w * h))])

        return _outputs(raw, one)
