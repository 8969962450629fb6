"""Offline helpers for tests and benchmarks: a tiny BERT tokenizer built on the fly."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# A small English word list; anything else falls back to characters / [UNK].
DEFAULT_WORDS = (
    "a an the and of in on at with to is are two three some next by near this that there it his her "
    "man woman person people child boy girl dog dogs cat cats horse bird car cars bus truck bicycle bike "
    "motorcycle train boat plane table chair sofa bed cup bottle book phone laptop tree grass road street "
    "sky water shirt hat ball bag red blue green white black old young small big wooden stone bridge "
    "floor wall window door riding sitting standing holding giraffe zebra elephant bear sheep cow "
    "traffic light sign stop fire hydrant umbrella kite skateboard surfboard pizza cake banana apple "
    "orange broccoli carrot toilet tv mouse keyboard oven sink clock vase scissors toothbrush"
).split()


def build_tiny_tokenizer(words: Iterable[str] = DEFAULT_WORDS, directory: str | Path | None = None) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over ``words``, punctuation and single letters.

    Written to ``directory`` (a fresh temporary one by default) as ``vocab.txt``
    and loaded with ``BertTokenizerFast.from_pretrained`` -- no network access.
    """
    vocab = list(SPECIAL_TOKENS)
    extra = list(".,;:!?'\"()-") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    extra += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    for tok in list(words) + extra:
        if tok not in vocab:
            vocab.append(tok)
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="glip_tok_"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(directory))
