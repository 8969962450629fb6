"""Vocabularies (class lists) and prompt templates for CLIP text classifiers.

A vocabulary is given in a config as one of

* a built-in name: ``coco-stuff-171``, ``pascal-context-59``,
  ``pascal-voc-20``, ``coco-80``;
* an inline list of class names;
* ``{file: path/to/classes.txt}``: one class per line, ``#`` starts a
  comment, blank lines are ignored.  A line ``a, b, c`` lists synonyms of
  one class: their text embeddings are averaged and the first is the name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # vocabularies and templates are read without torch (config checks, CPU pools)
    import torch

BUILTIN_VOCABULARIES = ("coco-stuff-171", "pascal-context-59", "pascal-voc-20", "coco-80")

# MaskCLIP's prompt set is open_clip's 80 ImageNet templates plus five that
# describe a scene rather than an object photo.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


@dataclass(frozen=True)
class Vocabulary:
    """Class names, each with one or more synonyms used for its text embedding."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)


def _parse_lines(lines: Sequence[str], source: str) -> Vocabulary:
    names, synonyms = [], []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = tuple(p.strip() for p in line.split(",") if p.strip())
        names.append(parts[0])
        synonyms.append(parts)
    if not names:
        raise ValueError(f"vocabulary {source} is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"vocabulary {source} repeats class names {dupes}")
    return Vocabulary(tuple(names), tuple(synonyms), source)


def load_vocabulary(spec: str | Sequence[str] | dict) -> Vocabulary:
    if isinstance(spec, str):
        if spec not in BUILTIN_VOCABULARIES:
            raise ValueError(
                f"unknown vocabulary {spec!r}: use one of {list(BUILTIN_VOCABULARIES)}, "
                "a list of class names, or {file: path}"
            )
        text = resources.files("labelmill.teachers").joinpath(f"vocabularies/{spec}.txt").read_text()
        return _parse_lines(text.splitlines(), spec)
    if isinstance(spec, dict):
        if set(spec) != {"file"}:
            raise ValueError("a vocabulary mapping must be exactly {file: path}")
        path = Path(spec["file"]).expanduser()
        if not path.is_file():
            raise ValueError(f"vocabulary file {path} does not exist")
        return _parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
    return _parse_lines(list(spec), "inline list")


def load_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``maskclip85`` (MaskCLIP's 85), ``short`` (open_clip's 7), ``single`` or a list."""
    if isinstance(spec, str):
        if spec == "single":
            return ("a photo of a {}.",)
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        def as_format(fns) -> tuple[str, ...]:
            return tuple(fn("{}") for fn in fns)

        if spec == "maskclip85":
            out = as_format(OPENAI_IMAGENET_TEMPLATES) + SCENE_TEMPLATES
            assert len(out) == 85, len(out)
            return out
        if spec == "short":
            return as_format(SIMPLE_IMAGENET_TEMPLATES)
        raise ValueError(f"unknown template set {spec!r}: maskclip85, short, single, or a list")
    out = tuple(spec)
    if not out or any("{}" not in t for t in out):
        raise ValueError("every prompt template must contain '{}' where the class name goes")
    return out


def _cache_dir() -> Path:
    root = os.environ.get("LABELMILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "labelmill"
    )
    return Path(root) / "text-embeddings"


def text_classifier(
    encode_text: Callable[["torch.Tensor"], "torch.Tensor"],
    tokenize: Callable[[list[str]], "torch.Tensor"],
    vocabulary: Vocabulary,
    templates: Sequence[str],
    *,
    cache_key: str | None = None,
    device: "torch.device | str" = "cpu",
    batch_size: int = 256,
) -> "torch.Tensor":
    """(num_classes, dim) L2-normalised prompt-ensemble text embeddings.

    For each class every template is filled with every synonym; the
    normalised embeddings are averaged and normalised again.  With
    ``cache_key`` (which must identify the weights) the result is cached on
    local disk, because encoding 171 classes x 85 prompts takes minutes on a
    CPU and every actor would otherwise repeat it.
    """
    import torch

    with torch.inference_mode():
        return _text_classifier(encode_text, tokenize, vocabulary, templates, cache_key, device, batch_size)


def _text_classifier(encode_text, tokenize, vocabulary, templates, cache_key, device, batch_size):
    import torch
    import torch.nn.functional as F

    path = None
    if cache_key is not None:
        digest = hashlib.sha256(
            repr((cache_key, vocabulary.synonyms, tuple(templates))).encode()
        ).hexdigest()[:24]
        path = _cache_dir() / f"{digest}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if cached.shape[0] == len(vocabulary):
                    return cached.to(device)
            except Exception:  # a torn or foreign file: recompute and overwrite
                path.unlink(missing_ok=True)

    prompts, owner = [], []
    for ci, syns in enumerate(vocabulary.synonyms):
        for syn in syns:
            for template in templates:
                prompts.append(template.format(syn))
                owner.append(ci)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(encode_text(tokens).float(), dim=-1))
    emb = torch.cat(chunks)
    owner_t = torch.tensor(owner, device=emb.device)
    summed = torch.zeros(len(vocabulary), emb.shape[1], device=emb.device).index_add_(0, owner_t, emb)
    classifier = F.normalize(summed, dim=-1)

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(classifier.cpu(), tmp)
        os.replace(tmp, path)
    return classifier
