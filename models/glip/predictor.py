"""Batched GLIP inference: images + prompts in, detections in original pixels out.

Batching and exactness
----------------------
GLIP's outputs depend on the padded input size, not only on the image:
zero padding is seen by the convolutions near the border, by Swin's window
partition and cyclic shift, by GroupNorm statistics and global average
pooling in the DyHead, and by the text->image attention (which spans every
pixel position).  Padding several images to a common size therefore changes
their results.  This predictor never does that.  Each image is padded to the
shape it would get on its own -- the next multiple of 32 (GLIP's
``SIZE_DIVISIBILITY``), or, if ``canvas_sizes`` is given, the smallest listed
canvas that holds it -- and only images with identical padded shapes share a
forward pass.  Results are thus those of running each image alone on the same
padded shape, up to floating-point reassociation.

``canvas_sizes`` trades fidelity to GLIP's single-image behaviour for
throughput: with a handful of canvases (e.g. ``(800, 1344)`` and
``(1344, 800)``) most images fall into few groups, so batches are large.

Text is batched with padding to the longest caption; padded tokens are
masked out of every attention that reads text and their logits are never
looked at, so they do not change results either.

Prompts longer than the query length are handled by giving an image a list
of prompts (chunks, e.g. from :func:`vocabulary_prompts`).  The image is
encoded once, each chunk runs through the text encoder and fusion head, and
the detections are concatenated with phrase indices offset so that they
index the concatenated phrase list (GLIP's chunked LVIS evaluation also just
concatenates the per-chunk results).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch

from labelmill.models.transfer import HostCopy

from .model import GLIP
from .postprocess import RawDetections, merge_and_pack, select_batch
from .preprocess import PreparedImage, choose_canvas, pad_to, padded_size, prepare_image, prepare_image_device
from .text import Prompt, Tokenized, encode_tokenized, tokenize_prompt, vocabulary_prompts

PromptLike = Union[Prompt, Tokenized, Sequence[Union[Prompt, Tokenized]]]


@dataclass
class Detections:
    """Detections for one image, sorted by descending score.

    ``boxes`` are xyxy in original-image pixels (inclusive-extent convention
    of GLIP); ``phrase_indices`` index ``phrases`` (for chunked prompts, the
    concatenation of all chunks' phrases).
    """

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    phrase_indices: np.ndarray  # (N,) int64
    phrases: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class GLIPPredictor:
    """Runs :class:`GLIP` on lists of RGB uint8 images with one prompt (or chunk list) each.

    The model is moved to ``device`` (default: where its parameters are) and
    put in eval mode.  ``min_size``/``max_size`` override the config's resize
    (smaller is faster); ``pre_nms_thresh``, ``pre_nms_top_n``, ``nms_thresh``
    and ``detections_per_prompt`` override GLIP's ATSS settings (0.05, 1000,
    0.6, 100).  ``score_floor`` drops final detections scoring below it and
    ``max_detections_per_image`` caps the merged list (``None``: keep all,
    as GLIP does when it concatenates vocabulary chunks).  ``autocast_dtype``
    (e.g. ``torch.float16`` on CUDA) enables autocast; by default everything
    runs in float32.  ``max_batch_size`` bounds images per backbone pass and
    prompts per head pass.
    """

    def __init__(
        self,
        model: GLIP,
        tokenizer,
        *,
        device: str | torch.device | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        pre_nms_thresh: float | None = None,
        pre_nms_top_n: int | None = None,
        nms_thresh: float | None = None,
        detections_per_prompt: int | None = None,
        score_floor: float = 0.0,
        max_detections_per_image: int | None = None,
        max_batch_size: int = 8,
        canvas_sizes: Sequence[tuple[int, int]] | None = None,
        autocast_dtype: torch.dtype | None = None,
        pad_text_to_max_length: bool = False,
        device_preprocess: bool = False,
    ):
        cfg = model.cfg
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.min_size = min_size or cfg.min_size
        self.max_size = max_size or cfg.max_size
        self.pre_nms_thresh = cfg.pre_nms_thresh if pre_nms_thresh is None else pre_nms_thresh
        self.pre_nms_top_n = pre_nms_top_n or cfg.pre_nms_top_n
        self.nms_thresh = cfg.nms_thresh if nms_thresh is None else nms_thresh
        self.detections_per_prompt = detections_per_prompt or cfg.detections_per_image
        self.score_floor = score_floor
        self.max_detections_per_image = max_detections_per_image
        self.max_batch_size = max(1, int(max_batch_size))
        if canvas_sizes is not None:
            canvas_sizes = [tuple(int(v) for v in c) for c in canvas_sizes]
            div = cfg.size_divisibility
            if any(h % div or w % div for h, w in canvas_sizes):
                raise ValueError(f"canvas sizes must be multiples of {div}")
        self.canvas_sizes = canvas_sizes
        self.autocast_dtype = autocast_dtype
        self.pad_text_to_max_length = pad_text_to_max_length
        self.device_preprocess = device_preprocess

    # ----------------------------------------------------------------- helpers
    def prepare(self, image) -> PreparedImage:
        """Resize and normalise one image: on the device from a uint8 tensor when ``device_preprocess``,
        else with PIL on the host (the reference)."""
        if self.device_preprocess and isinstance(image, torch.Tensor):
            return prepare_image_device(image.to(self.device), self.cfg.pixel_mean, self.cfg.pixel_std,
                                        self.min_size, self.max_size)
        return prepare_image(image, self.cfg.pixel_mean, self.cfg.pixel_std, self.min_size, self.max_size)

    def tokenized(self, prompt: PromptLike) -> list[Tokenized]:
        """A prompt (or chunk list) as tokenised chunks; :class:`Tokenized` ones pass as they are."""
        if isinstance(prompt, Tokenized):
            return [prompt]
        if isinstance(prompt, Prompt):
            return [tokenize_prompt(self.tokenizer, prompt, self.cfg.max_query_len)]
        return [c for p in prompt for c in self.tokenized(p)]

    def padded_shape(self, resized: tuple[int, int]) -> tuple[int, int]:
        if self.canvas_sizes:
            return choose_canvas(resized[0], resized[1], self.canvas_sizes)
        return padded_size(resized[0], resized[1], self.cfg.size_divisibility)

    def vocabulary_prompts(self, class_names: Sequence[str], **kwargs) -> list[Prompt]:
        return vocabulary_prompts(class_names, self.tokenizer, self.cfg.max_query_len, **kwargs)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # --------------------------------------------------------------- inference
    def predict(self, images: Sequence, prompts: Sequence[PromptLike]) -> list[Detections]:
        """Detect the phrases of ``prompts[i]`` in ``images[i]`` for every i."""
        return self.predict_async(images, prompts)()

    def predict_async(self, images: Sequence, prompts: Sequence[PromptLike]) -> Callable[[], list[Detections]]:
        """Queue the work of :meth:`predict`; calling the result waits for the one host copy."""
        waiting, chunks = self._queue(images, prompts)

        def detections() -> list[Detections]:
            packed, counts = waiting()
            return self._unpack(packed, chunks, counts)

        return detections

    def predict_packed(self, images: Sequence, prompts: Sequence[PromptLike]) -> Callable[[], tuple[np.ndarray, list[int]]]:
        """Like :meth:`predict_async`, but the result is the batch's packed (N, 6) rows -- x1, y1, x2, y2,
        score, phrase index -- and each image's row count, as they come back from the device."""
        return self._queue(images, prompts)[0]

    def _queue(self, images: Sequence, prompts: Sequence[PromptLike]):
        if len(images) != len(prompts):
            raise ValueError("need exactly one prompt (or list of prompt chunks) per image")
        chunks = [self.tokenized(p) for p in prompts]
        if any(not c for c in chunks):
            raise ValueError("empty prompt list")
        prepared = [self.prepare(img) for img in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(prepared):
            groups[self.padded_shape(p.resized_size)].append(i)

        raw: dict[tuple[int, int], RawDetections] = {}
        with torch.inference_mode(), self._autocast():
            for shape, members in groups.items():
                for image_batch in _batches(members, self.max_batch_size):
                    self._run_images(shape, image_batch, prepared, chunks, raw)
            return self._merge_all(prepared, chunks, raw), chunks

    def predict_vocabulary(self, images: Sequence, class_names: Sequence[str], **prompt_kwargs) -> list[Detections]:
        """Detect a class list in every image; ``phrase_indices`` index ``class_names``."""
        prompt_chunks = self.vocabulary_prompts(class_names, **prompt_kwargs)
        return self.predict(images, [prompt_chunks] * len(images))

    def _run_images(self, shape, image_batch, prepared, chunks, raw) -> None:
        pixels = pad_to([prepared[i].tensor for i in image_batch], shape)
        if self.device.type == "cuda" and pixels.device.type != "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        features = self.model.encode_images(pixels)
        jobs = [(pos, i, j) for pos, i in enumerate(image_batch) for j in range(len(chunks[i]))]
        for job_batch in _batches(jobs, self.max_batch_size):
            positions = [pos for pos, _, _ in job_batch]
            if positions == list(range(len(image_batch))):
                job_features = features
            else:
                index = torch.tensor(positions, device=self.device)
                job_features = [f.index_select(0, index) for f in features]
            encoded = encode_tokenized(
                [chunks[i][j] for _, i, j in job_batch],
                self.cfg.max_query_len,
                self.pad_text_to_max_length,
                pad_token_id=self.tokenizer.pad_token_id or 0,
            )
            out = self.model.predict_from_features(
                job_features, encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device)
            )
            found = select_batch(
                out.box_deltas,
                out.centerness,
                out.token_logits,
                out.anchors,
                list(encoded.positive_maps[: len(job_batch)]),
                [prepared[i].resized_size for _, i, _ in job_batch],
                pre_nms_thresh=self.pre_nms_thresh,
                pre_nms_top_n=self.pre_nms_top_n,
                nms_thresh=self.nms_thresh,
                max_detections=self.detections_per_prompt,
            )
            for (_, i, j), det in zip(job_batch, found):
                raw[(i, j)] = det

    def _merge_all(self, prepared: list[PreparedImage], chunks: list[list[Tokenized]], raw):
        """Merge chunks per image on the device; one device-to-host copy for the whole call."""
        if not prepared:
            return lambda: (np.zeros((0, 6)), [])
        packed, counts = merge_and_pack(
            [[raw[(i, j)] for j in range(len(chunks[i]))] for i in range(len(prepared))],
            [np.cumsum([0] + [p.n_phrases for p in c]).tolist()[:-1] for c in chunks],
            [p.scale for p in prepared],
            score_floor=self.score_floor,
            max_detections=self.max_detections_per_image,
        )
        copy = HostCopy(packed)
        return lambda: (copy.get().numpy(), counts)

    @staticmethod
    def _unpack(host: np.ndarray, chunks: list[list[Tokenized]], counts: list[int]) -> list[Detections]:
        out, start = [], 0
        for prompts, n in zip(chunks, counts):
            rows = host[start : start + n]
            start += n
            out.append(
                Detections(
                    rows[:, :4].astype(np.float32),
                    rows[:, 4].astype(np.float32),
                    rows[:, 5].astype(np.int64),
                    tuple(t for p in prompts for t in p.texts),
                )
            )
        return out
