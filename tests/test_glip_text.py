"""Prompts: noun-phrase spans, vocabulary chunking and the phrase->token map."""

import pytest
import torch

from labelmill.models.glip import Phrase, Prompt, caption_prompt, encode_prompts, vocabulary_prompts
from labelmill.models.glip.testing import build_tiny_tokenizer
from labelmill.models.glip.text import clean_class_name, noun_phrase_spans, positive_map


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


CAPTIONS = [
    "A man in a red shirt is riding a bicycle next to the old stone bridge.",
    "Two dogs and the cat's toy on a wooden floor",
    "  There is a giraffe, a zebra and three elephants near the water!  ",
    "The U.S. president, Mr. Smith, waves at people.",
    "Close-up of a pizza with broccoli; someone's hand holds a knife.",
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_phrase_spans_index_the_caption_exactly(caption):
    prompt = caption_prompt(caption)
    assert prompt.phrases, "every test caption contains nouns"
    previous_end = 0
    for phrase in prompt.phrases:
        (start, end), = phrase.spans
        assert caption[start:end] == phrase.text
        assert phrase.text == phrase.text.strip() and phrase.text[-1] not in ".,;!"
        assert start >= previous_end  # in reading order, not overlapping
        previous_end = end


def test_caption_noun_phrases_follow_the_chunk_grammar():
    prompt = caption_prompt(CAPTIONS[0])
    assert prompt.texts == ("A man", "a red shirt", "a bicycle", "the old stone bridge")


def test_chunk_rule_on_hand_tagged_tokens():
    #         0        1         2         3          4         5         6        7
    tokens = [(0, 3, "DT"), (4, 7, "JJ"), (8, 11, "NN"), (12, 14, "IN"), (15, 18, "DT"),
              (19, 22, "DT"), (23, 27, "NNS"), (28, 31, "JJ"), (32, 33, "VBZ")]
    # "DT JJ NN" is one chunk; of "DT DT NNS" only the second DT joins; a lone JJ is not a chunk.
    assert noun_phrase_spans(tokens) == [(0, 11), (19, 27)]
    assert noun_phrase_spans([(0, 2, "JJ"), (3, 5, "JJR"), (6, 9, "NNP"), (10, 12, "NN")]) == [(0, 12)]
    assert noun_phrase_spans([]) == []


def test_prompt_rejects_spans_that_do_not_spell_the_phrase():
    with pytest.raises(ValueError):
        Prompt("a dog", (Phrase("dog", ((0, 3),)),))
    with pytest.raises(ValueError):
        Prompt("a dog", (Phrase("dog", ((2, 9),)),))
    Prompt("a dog", (Phrase("dog", ((2, 5),)),))


def test_vocabulary_prompt_format_and_spans(tok):
    (prompt,) = vocabulary_prompts(["person", "bicycle", "car"], tok)
    assert prompt.caption == "person. bicycle. car. "
    assert [p.spans for p in prompt.phrases] == [((0, 6),), ((8, 15),), ((17, 20),)]
    (glip_eval,) = vocabulary_prompts(["traffic_light", "bus (vehicle)"], tok, trailing_separator=False)
    assert glip_eval.caption == "traffic light. bus"
    assert clean_class_name("hot_dog  (food)") == "hot dog"


def test_vocabulary_is_split_into_chunks_that_fit(tok):
    names = "dog cat horse bird car bus truck boat plane table chair sofa bed cup bottle".split()
    # Every class costs 2 tokens ("dog" "."), plus [CLS] and [SEP]: 7 classes per 16 tokens.
    chunks = vocabulary_prompts(names, tok, max_tokens=16)
    assert [len(c.phrases) for c in chunks] == [7, 7, 1]
    assert [t for c in chunks for t in c.texts] == names
    for c in chunks:
        assert len(tok(c.caption)["input_ids"]) <= 16
    with pytest.raises(ValueError):
        vocabulary_prompts(["traffic light sign stop fire hydrant umbrella kite"], tok, max_tokens=6)


def test_positive_map_covers_phrase_tokens(tok):
    caption = "a red bicycle. dog"
    prompt = Prompt(caption, (Phrase("red bicycle", ((2, 13),)), Phrase(" dog", ((14, 18),))))
    enc = tok(caption, return_offsets_mapping=True)
    # tokens: [CLS] a red bicycle . dog [SEP]
    pm = positive_map(enc["offset_mapping"], prompt, 10)
    assert pm[0].nonzero().flatten().tolist() == [2, 3]
    # The span starts on a space, which has no token: the next character's token is used.
    assert pm[1].nonzero().flatten().tolist() == [5]
    assert pm.shape == (2, 10)


def test_encode_prompts_pads_and_normalises(tok):
    prompts = [caption_prompt("a dog and a cat"), Prompt("zebra", (Phrase("zebra", ((0, 5),)),))]
    enc = encode_prompts(tok, prompts, max_length=32)
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, 7)
    assert enc.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    for pm in enc.positive_maps:
        assert pm.shape[1] == 7
        assert torch.allclose(pm.sum(1), torch.ones(pm.shape[0]))
    assert enc.positive_maps[0][0].nonzero().flatten().tolist() == [1, 2]  # "a dog"
    padded = encode_prompts(tok, prompts, max_length=32, pad_to_max_length=True)
    assert padded.input_ids.shape == (2, 32)
    assert torch.equal(padded.positive_maps[0][:, :7], enc.positive_maps[0])


def test_truncated_phrase_maps_to_no_token(tok):
    caption = "dog cat horse bird"
    prompt = Prompt(caption, (Phrase("dog", ((0, 3),)), Phrase("bird", ((14, 18),))))
    with pytest.warns(UserWarning):
        enc = encode_prompts(tok, [prompt], max_length=4)  # [CLS] dog cat [SEP]
    assert enc.positive_maps[0][0].tolist() == [0, 1, 0, 0]
    assert enc.positive_maps[0][1].sum() == 0
