"""GLIPPredictor: batched == one-by-one, chunked vocabularies, original-pixel boxes."""

import numpy as np
import pytest
import torch

from labelmill.models.glip import GLIP, Detections, GLIPConfig, GLIPPredictor, Phrase, Prompt, caption_prompt
from labelmill.models.glip.model import GLIPOutput
from labelmill.models.glip.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GLIP(GLIPConfig.tiny()).eval()
    with torch.no_grad():
        # Spread the token scores so that rankings are far from float ties.
        m.rpn.head.log_scale.fill_(-2.5)
        m.rpn.head.bias0.fill_(-1.0)
    return m


def images():
    rng = np.random.default_rng(0)
    shapes = [(120, 160), (96, 128), (200, 100), (121, 161), (60, 80)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


PROMPTS = [
    "A man riding a red bicycle next to a dog.",
    "two cats on the old wooden table",
    "a zebra",
    "the boy is holding a kite and a ball near the tree",
    "a bus and three cars on the street",
]


def assert_same(a: Detections, b: Detections, atol=1e-4):
    assert a.phrases == b.phrases
    assert len(a) == len(b) > 0
    assert np.array_equal(a.phrase_indices, b.phrase_indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=atol)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol * 100)


def test_batched_equals_one_by_one(model, tok):
    prompts = [caption_prompt(p) for p in PROMPTS]
    imgs = images()
    predictor = GLIPPredictor(model, tok, max_batch_size=4)
    shapes = [predictor.padded_shape(predictor.prepare(i).resized_size) for i in imgs]
    assert len(set(shapes)) < len(shapes), "some images must share a forward pass"
    batched = predictor.predict(imgs, prompts)
    single = [predictor.predict([img], [p])[0] for img, p in zip(imgs, prompts)]
    for a, b in zip(batched, single):
        assert_same(a, b)
    # Different images/prompts really give different detections.
    assert not np.allclose(batched[0].scores[:5], batched[1].scores[:5])


def test_boxes_are_in_original_pixels(model, tok):
    img = images()[0]  # 120 x 160, resized to 128 x 170 by the tiny config
    predictor = GLIPPredictor(model, tok)
    det = predictor.predict([img], [caption_prompt(PROMPTS[0])])[0]
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= 160).all() and (det.boxes[:, 3] <= 120).all()
    # Same detections before rescaling: undo the 170/160 and 128/120 scale.
    from labelmill.models.glip.predictor import GLIPPredictor as P

    class NoRescale(P):
        def prepare(self, image):
            prep = super().prepare(image)
            prep.orig_size = prep.resized_size
            return prep

    raw = NoRescale(model, tok).predict([img], [caption_prompt(PROMPTS[0])])[0]
    np.testing.assert_allclose(det.boxes, raw.boxes * np.array([160 / 170, 120 / 128] * 2, dtype=np.float32), rtol=1e-5)
    assert (raw.boxes[:, 2] <= 169).all() and (raw.boxes[:, 3] <= 127).all()  # clipped to the resized image


def test_score_floor_and_limits(model, tok):
    imgs, prompts = images()[:2], [caption_prompt(p) for p in PROMPTS[:2]]
    full = GLIPPredictor(model, tok).predict(imgs, prompts)
    floor = float(np.median(full[0].scores))
    floored = GLIPPredictor(model, tok, score_floor=floor, max_detections_per_image=7).predict(imgs, prompts)
    assert len(floored[0]) == min(7, int((full[0].scores >= floor).sum()))
    np.testing.assert_allclose(floored[0].scores, full[0].scores[: len(floored[0])], atol=1e-6)
    assert all(len(d) <= 100 for d in full)
    assert all((np.diff(d.scores) <= 0).all() for d in full)


def test_canvas_mode_groups_by_canvas_and_matches_alone(model, tok):
    imgs, prompts = images(), [caption_prompt(p) for p in PROMPTS]
    predictor = GLIPPredictor(model, tok, canvas_sizes=[(128, 224), (224, 128)])
    assert {predictor.padded_shape(predictor.prepare(i).resized_size) for i in imgs} == {(128, 224), (224, 128)}
    batched = predictor.predict(imgs, prompts)
    for img, p, b in zip(imgs, prompts, batched):
        assert_same(predictor.predict([img], [p])[0], b)
    with pytest.raises(ValueError):
        GLIPPredictor(model, tok, canvas_sizes=[(100, 100)])


def test_works_inside_inference_mode(model, tok):
    with torch.inference_mode():
        det = GLIPPredictor(model, tok).predict(images()[:1], [caption_prompt("a dog")])
    assert det[0].phrases == ("a dog",) and len(det[0]) > 0


class KeywordDetector(GLIP):
    """Tiny GLIP whose token logits fire only on one token id, everywhere."""

    def __init__(self, cfg, token_id):
        super().__init__(cfg)
        self.token_id = token_id

    def predict_from_features(self, features, input_ids, attention_mask):
        out = super().predict_from_features(features, input_ids, attention_mask)
        hit = (input_ids == self.token_id).float()[:, None, :]  # (B, 1, L)
        logits = [torch.full_like(t, -10.0) + 20.0 * hit for t in out.token_logits]
        return GLIPOutput(out.box_deltas, out.centerness, logits, out.anchors)


def test_chunked_vocabulary_maps_detections_to_the_right_class(tok):
    names = (
        "person man woman child boy girl dog cat horse bird car bus truck bicycle motorcycle train boat plane "
        "table chair sofa bed cup bottle book phone laptop tree grass road sky water shirt hat ball bag "
        "giraffe zebra elephant bear sheep cow kite"
    ).split()
    torch.manual_seed(0)
    model = KeywordDetector(GLIPConfig.tiny(), tok.convert_tokens_to_ids("zebra")).eval()
    predictor = GLIPPredictor(model, tok)
    chunks = predictor.vocabulary_prompts(names)
    assert len(chunks) == 3  # 44 two-token classes, 32-token queries
    zebra_chunk = next(i for i, c in enumerate(chunks) if "zebra" in c.texts)
    assert zebra_chunk == 2
    dets = predictor.predict_vocabulary(images()[:2], names)
    for det in dets:
        assert det.phrases == tuple(names)
        assert len(det) > 0
        assert set(det.phrase_indices.tolist()) == {names.index("zebra")}
    # Merging keeps each chunk's detections intact: compare with running the chunk alone.
    alone = predictor.predict(images()[:1], [chunks[zebra_chunk]])[0]
    offset = sum(len(c.phrases) for c in chunks[:zebra_chunk])
    assert np.array_equal(alone.phrase_indices + offset, dets[0].phrase_indices)
    np.testing.assert_allclose(alone.scores, dets[0].scores, atol=1e-6)
    np.testing.assert_allclose(alone.boxes, dets[0].boxes, atol=1e-4)


def test_mixed_prompt_kinds_and_validation(model, tok):
    imgs = images()[:2]
    custom = Prompt("the red ball", (Phrase("red ball", ((4, 12),)), Phrase("the", ((0, 3),))))
    dets = GLIPPredictor(model, tok).predict(imgs, [custom, [caption_prompt("a dog"), caption_prompt("a cat")]])
    assert dets[0].phrases == ("red ball", "the")
    assert dets[1].phrases == ("a dog", "a cat")
    assert set(dets[1].phrase_indices.tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        GLIPPredictor(model, tok).predict(imgs, [custom])
