"""Image preprocessing: GLIP's resize rule, BGR/normalisation, padding and canvases."""

import numpy as np
import pytest
import torch
from PIL import Image

from labelmill.models.glip import GLIPConfig
from labelmill.models.glip.preprocess import choose_canvas, pad_to, padded_size, prepare_image, target_size

CFG = GLIPConfig.glip_t()


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),  # short side to 800, long side floor(800 * 640 / 480)
        ((640, 480), (1066, 800)),
        ((1000, 3000), (444, 1332)),  # long side would exceed 1333: short side round(1333 / 3) = 444
        ((800, 1000), (800, 1000)),  # already right: untouched
        ((400, 400), (800, 800)),
    ],
)
def test_target_size_follows_glip_rule(hw, expected):
    assert target_size(*hw, 800, 1333) == expected


def test_bgr_normalisation_and_scale():
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    prep = prepare_image(rgb, CFG.pixel_mean, CFG.pixel_std, 80, 1333)
    assert prep.resized_size == (80, 120) and prep.orig_size == (40, 60)
    # Channel 0 of the model input is blue (30), channel 2 red (10).
    expected = [(30 - 103.530) / 57.375, (20 - 116.280) / 57.120, (10 - 123.675) / 58.395]
    assert prep.tensor[:, 5, 7].tolist() == pytest.approx(expected, abs=1e-5)
    assert prep.scale == pytest.approx((0.5, 0.5))


def test_torch_input_and_validation():
    rgb = np.random.default_rng(0).integers(0, 255, (33, 47, 3), dtype=np.uint8)
    a = prepare_image(rgb, CFG.pixel_mean, CFG.pixel_std, 64, 100)
    b = prepare_image(torch.from_numpy(rgb), CFG.pixel_mean, CFG.pixel_std, 64, 100)
    assert torch.equal(a.tensor, b.tensor)
    with pytest.raises(ValueError):
        prepare_image(rgb.astype(np.float32), CFG.pixel_mean, CFG.pixel_std, 64, 100)
    with pytest.raises(ValueError):
        prepare_image(rgb[..., :2], CFG.pixel_mean, CFG.pixel_std, 64, 100)


def test_padding_to_multiple_of_32_and_canvases():
    assert padded_size(800, 1066, 32) == (800, 1088)
    assert padded_size(444, 1332, 32) == (448, 1344)
    canvases = [(800, 1344), (1344, 800), (448, 1344)]
    assert choose_canvas(444, 1332, canvases) == (448, 1344)
    assert choose_canvas(800, 1066, canvases) == (800, 1344)
    with pytest.raises(ValueError):
        choose_canvas(900, 900, canvases)
    imgs = [torch.ones(3, 2, 3), torch.full((3, 3, 1), 2.0)]
    out = pad_to(imgs, (4, 4))
    assert out.shape == (2, 3, 4, 4)
    assert out[0, :, :2, :3].eq(1).all() and out[0, :, 2:].eq(0).all() and out[0, :, :, 3:].eq(0).all()
    assert out[1, :, :3, :1].eq(2).all() and out[1].sum() == 2 * 9


def _test_photos():
    """coco128 photos when the shared data is here, else synthetic ones (the tests pass without it)."""
    import glob

    from helpers import COCO128, photo

    files = sorted(glob.glob(str(COCO128 / "images" / "*.jpg")))[:6]
    if files:
        return [np.ascontiguousarray(np.asarray(Image.open(f).convert("RGB"))) for f in files]
    return [photo(640, 480, seed=s) for s in range(3)] + [photo(333, 500, seed=7)]


def test_device_preprocessing_is_within_one_level_of_pil():
    from labelmill.models.glip.preprocess import prepare_image_device

    cfg = GLIPConfig.tiny()
    std = torch.tensor(cfg.pixel_std)[:, None, None]
    equal = total = 0
    for a in _test_photos():
        for size in ((800, 1333), (480, 800)):  # enlarge and shrink
            pil = prepare_image(a, cfg.pixel_mean, cfg.pixel_std, *size)
            dev = prepare_image_device(torch.from_numpy(a), cfg.pixel_mean, cfg.pixel_std, *size)
            assert dev.resized_size == pil.resized_size and dev.orig_size == pil.orig_size
            levels = ((pil.tensor - dev.tensor) * std).abs()  # in 0..255 units
            assert float(levels.max()) <= 1.0 + 1e-3
            equal += int((levels < 1e-3).sum())
            total += levels.numel()
    assert equal / total > 0.7  # measured 0.85 on coco128 (BENCHMARKS.md)


def test_device_and_pil_paths_agree_exactly_without_a_resize():
    """The decoder usually delivers GLIP's size already: then both paths give the same detections."""
    from labelmill.teachers.base import ImageBatch
    from labelmill.teachers.glip import GLIPTeacher, GLIPTeacherConfig

    section = dict(type="glip", architecture="tiny", tokenizer="builtin-test", mode="vocabulary",
                   vocabulary=["person", "car", "dog"], min_size=64, max_size=128, score_floor=0.0,
                   pre_nms_thresh=0.0, max_detections_per_image=20)
    a = np.ascontiguousarray(np.asarray(Image.fromarray(_test_photos()[0]).resize((96, 64))))
    batch = ImageBatch(None, [a.shape[:2]], [(480, 720)], [None], ["k"], [{}], host=[a], images=[torch.from_numpy(a)])
    outs = {}
    for pre in ("pil", "device"):
        teacher = GLIPTeacher(GLIPTeacherConfig(**section, preprocess=pre), torch.device("cpu"), allow_random_init=True)
        assert teacher.device_preprocess == (pre == "device")
        (outs[pre],) = teacher.predict(batch, {})
    assert outs["pil"].labels and outs["pil"].labels == outs["device"].labels
