"""ViLD region embeddings: geometry, crops vs. PIL + open_clip, dense pooling, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import TINY_CLIP, make_shards, photo, run_config, tiny_maskclip
from labelmill.config import load_config
from labelmill.schemas.records import Label, TeacherOutput
from labelmill.schemas.tables import regions_array
from labelmill.teachers.base import ImageBatch
from labelmill.teachers.maskclip import MaskCLIPConfig, MaskCLIPTeacher
from labelmill.teachers.vild import (
    ViLDConfig,
    ViLDEmbedder,
    central_square,
    pool_regions,
    scale_boxes,
    select_proposals,
)

# a tiny ViT at CLIP's usual 224 input, so crops go through open_clip's real eval transform
TINY_224 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def embedder(**kw) -> ViLDEmbedder:
    kw.setdefault("arch_config", TINY_CLIP)
    cfg = ViLDConfig(pretrained=None, **kw)
    return ViLDEmbedder(cfg, torch.device("cpu"), allow_random_init=True)


def batch_of(*arrays, metas=None, work=None) -> ImageBatch:
    """Images at working size ``work`` (default: their own size) with original sizes of ``arrays``."""
    shown = [a if work is None else np.asarray(Image.fromarray(a).resize(work[i][::-1], Image.BILINEAR))
             for i, a in enumerate(arrays)]
    side = max(max(a.shape[:2]) for a in shown)
    canvas = torch.zeros(len(arrays), side, side, 3, dtype=torch.uint8)
    for i, a in enumerate(shown):
        canvas[i, : a.shape[0], : a.shape[1]] = torch.from_numpy(np.array(a))
    return ImageBatch(canvas, [a.shape[:2] for a in shown], [a.shape[:2] for a in arrays], [None] * len(arrays),
                      [f"k{i}" for i in range(len(arrays))], metas or [{} for _ in arrays])


# ----------------------------------------------------------------- geometry


def test_crops_grow_about_the_centre_and_clip_at_the_border():
    boxes = torch.tensor([[10.0, 10, 30, 50], [0, 0, 20, 20], [80, 90, 100, 100]])
    got = scale_boxes(boxes, 1.5, height=100, width=100)
    # centre (20, 30), size 20x40 -> 30x60; then corners clipped to the image
    assert torch.allclose(got[0], torch.tensor([5.0, 0, 35, 60]))
    assert torch.allclose(got[1], torch.tensor([0.0, 0, 25, 25]))
    assert torch.allclose(got[2], torch.tensor([75.0, 87.5, 100, 100]))
    assert torch.equal(scale_boxes(boxes, 1.0, 100, 100), boxes)
    sq = central_square(torch.tensor([[0.0, 0, 40, 10], [5, 0, 15, 30]]))
    assert torch.allclose(sq, torch.tensor([[15.0, 0, 25, 10], [5, 10, 15, 20]]))


def test_proposals_merge_sources_then_nms_then_cap():
    metas = [{"rpn": [[0, 0, 40, 40, 0.9], [1, 1, 41, 41, 0.8], [50, 10, 90, 60, 0.3],
                      [10, 10, 11, 40, 0.99], [-20, -5, 30, 30, 0.01]]}]
    glip = TeacherOutput(labels=[
        Label(kind="box", score=0.95, bbox=(60.0, 20.0, 30.0, 30.0), class_name="dog"),
        Label(kind="box", score=0.02, bbox=(5.0, 5.0, 10.0, 10.0), class_name="cat"),
    ])
    e = embedder(
        proposals=[{"teacher": "glip", "min_score": 0.05}, {"meta_field": "rpn"}],
        whole_image=True, nms_iou=0.5, max_regions=4, min_box_size=2,
    )
    (boxes, scores, sources, dropped), = e.proposals(batch_of(photo(96, 64), metas=metas), {"glip": [glip]})
    # the 1-px-wide box is dropped, [1,1,41,41] is suppressed by [0,0,40,40], the
    # low-score GLIP box is below its floor, the out-of-image box is clipped, cap 4
    assert scores.tolist() == pytest.approx([1.0, 0.95, 0.9, 0.3])
    assert sources == ["image", "glip", "json:rpn", "json:rpn"]
    assert dropped == 1  # the 1-px-wide box
    assert boxes[1].tolist() == [60, 20, 90, 50]
    assert boxes[0].tolist() == [0, 0, 96, 64]
    assert boxes[3].tolist() == [50, 10, 90, 60]
    keep = select_proposals(torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), torch.tensor([0.1, 0.2]), 1.0, 5)
    assert keep.tolist() == [1, 0]  # iou 1 keeps duplicates, ordered by score


@pytest.mark.parametrize("mode", ["crop", "dense"])
def test_an_image_without_proposals_gets_an_empty_region_set(mode):
    e = embedder(proposals=[{"meta_field": "p"}], mode=mode, dense_image_size=64)
    outs = e.predict(batch_of(photo(), photo(70, 50, 1), metas=[{}, {"p": [[1, 1, 30, 30]]}]), {})
    assert outs[0].regions.embeddings.shape == (0, 32) and outs[0].regions.boxes.shape == (0, 4)
    assert outs[1].regions.embeddings.shape == (1, 32)
    arr = regions_array([[("v", o.regions)] for o in outs])
    assert arr[0].as_py()[0]["dim"] == 32 and arr[0].as_py()[0]["embeddings"] == []


def test_bad_proposal_json_is_an_error_for_that_image():
    e = embedder(proposals=[{"meta_field": "rpn"}])
    with pytest.raises(ValueError, match="k0: json field 'rpn'"):
        e.proposals(batch_of(photo(), metas=[{"rpn": [[1, 2, 3]]}]), {})


def test_config_checks_references_to_earlier_teachers(tmp_path):
    base = run_config(str(tmp_path), str(tmp_path / "o"))
    vild = {"type": "vild", "pretrained": None, "arch_config": TINY_CLIP}
    with pytest.raises(ValueError, match="not listed before"):
        load_config({**base, "teachers": [{**vild, "proposals": [{"teacher": "maskclip"}]}, tiny_maskclip()]})
    ok = load_config({**base, "teachers": [tiny_maskclip(), {**vild, "proposals": [{"teacher": "maskclip"}],
                                                             "mode": "dense", "dense_features_from": "maskclip"}]})
    assert ok.teachers[1].dense_features_from == "maskclip"
    with pytest.raises(ValueError, match="only whole mode"):
        load_config({**base, "teachers": [tiny_maskclip(mode="slide"),
                                          {**vild, "mode": "dense", "dense_features_from": "maskclip"}]})
    other = {**TINY_CLIP, "embed_dim": 16}
    with pytest.raises(ValueError, match="other CLIP weights"):
        load_config({**base, "teachers": [tiny_maskclip(arch_config=other),
                                          {**vild, "mode": "dense", "dense_features_from": "maskclip"}]})
    with pytest.raises(ValueError, match="exactly one"):
        ViLDConfig(proposals=[{"teacher": "a", "meta_field": "b"}])


# ---------------------------------------------------------------- crop mode


def _pil_reference(image: np.ndarray, box, size: int = 224):
    """The slow path: one PIL crop per box, then open_clip's own eval transform."""
    import open_clip

    transform = open_clip.image_transform(size, is_train=False)
    return transform(Image.fromarray(image).crop(tuple(int(v) for v in box)))


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_crops_match_pil_crops_through_open_clip_preprocessing(scale):
    """The documented crop_resize: center_crop option equals open_clip's eval transform of a PIL crop."""
    from skimage import data

    image = data.chelsea()  # 300 x 451 photo
    h, w = image.shape[:2]
    boxes = torch.tensor([[100.0, 50, 300, 250], [0, 0, 120, 60], [379, 200, 451, 300], [40, 120, 340, 172]])
    e = embedder(arch_config=TINY_224, proposals=[{"meta_field": "p"}], crop_resize="center_crop")
    crop_boxes = e.crop_boxes(boxes, h, w, scale)
    mine = e.cut_crops(torch.from_numpy(image), crop_boxes)
    mean, std = e.mean, e.std
    for j, box in enumerate(scale_boxes(boxes, scale, h, w)):
        assert torch.equal(box, box.round())  # integer boxes: the PIL crop has no rounding of its own
        ref = _pil_reference(image, box.tolist())
        ref_px = (ref * std + mean) * 255
        diff = (mine[j] - ref_px).abs()
        assert diff.mean() < 2.5, (j, diff.mean())  # bicubic vs. area-averaged bilinear (measured <= 1.7)
        assert torch.quantile(diff.flatten(), 0.99) < 12, j  # measured <= 7.2
    # and the embeddings the encoder gives agree
    ref = torch.stack([_pil_reference(image, b.tolist()) for b in scale_boxes(boxes, scale, h, w)])
    with torch.no_grad():
        ref_emb = F.normalize(e.clip.encode_image(ref), dim=-1)
    got = e.encode_crops(mine)
    assert (got * ref_emb).sum(1).min() > 0.98


def test_default_crop_is_the_whole_box_resized_as_in_vild():
    """ViLD resizes the whole (scaled) box to the encoder's input: the default crop_resize is stretch."""
    from skimage import data

    image = data.chelsea()
    h, w = image.shape[:2]
    boxes = torch.tensor([[100.0, 50, 300, 250], [0, 0, 120, 60], [40, 120, 340, 172]])
    e = embedder(arch_config=TINY_224, proposals=[{"meta_field": "p"}])
    assert e.config.crop_resize == "stretch"
    mine = e.cut_crops(torch.from_numpy(image), e.crop_boxes(boxes, h, w, 1.0))
    for j, box in enumerate(boxes.tolist()):
        crop = Image.fromarray(image).crop(tuple(int(v) for v in box)).resize((224, 224), Image.BICUBIC)
        diff = (mine[j] - torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()).abs()
        assert diff.mean() < 3.0, (j, diff.mean())  # bilinear RoIAlign vs bicubic (documented)


def test_region_embedding_is_the_normalised_sum_of_its_scales():
    img = photo(120, 90, 3)
    e = embedder(arch_config=TINY_224, proposals=[{"meta_field": "p"}], crop_scales=[1.0, 1.5])
    ib = batch_of(img, metas=[{"p": [[10, 10, 70, 50], [30, 20, 110, 85]]}])
    out = e.predict(ib, {})[0].regions
    boxes = torch.from_numpy(out.boxes)
    parts = [e.encode_crops(e.cut_crops(ib.image(0), e.crop_boxes(boxes, 90, 120, s))) for s in (1.0, 1.5)]
    expected = F.normalize(parts[0] + parts[1], dim=-1)
    assert np.allclose(out.embeddings.astype(np.float32), expected.numpy(), atol=2e-3)
    assert np.allclose(np.linalg.norm(out.embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    assert out.embeddings.dtype == np.float16 and out.mode == "crop"


def test_boxes_are_in_original_pixels_when_the_decoder_downscaled():
    img = photo(200, 160, 4)
    meta = [{"p": [[20, 40, 120, 140]]}]
    e = embedder(arch_config=TINY_224, proposals=[{"meta_field": "p"}])
    full = e.predict(batch_of(img, metas=meta), {})[0].regions
    half = e.predict(batch_of(img, metas=meta, work=[(80, 100)]), {})[0].regions
    assert np.array_equal(full.boxes, half.boxes)
    cos = float((full.embeddings.astype(np.float32) * half.embeddings.astype(np.float32)).sum())
    assert cos > 0.97  # same region, seen at half the resolution
    assert full.pixel_scale == 1.0 and half.pixel_scale == pytest.approx(min(80 / 160, 100 / 200))


def test_null_work_size_crops_from_the_original_resolution():
    from labelmill.io.images import decode_image
    from labelmill.teachers.vild import ORIGINAL

    from helpers import encode

    cfg = ViLDConfig(pretrained=None, arch_config=TINY_CLIP, work_short_side=None, work_max_long_side=None)
    assert cfg.image_request().short_side == ORIGINAL
    big = photo(1800, 1200, 3)
    decoded = decode_image(encode(big, "PNG"), cfg.image_request(), max_pixels=10**8)
    assert decoded.pixels.shape[:2] == (1200, 1800)
    default = decode_image(encode(big, "PNG"), ViLDConfig(pretrained=None).image_request(), max_pixels=10**8)
    assert default.pixels.shape[:2] == (800, 1200)


@pytest.mark.parametrize("mode", ["crop", "dense"])
def test_batched_equals_one_image_at_a_time(mode):
    imgs = [photo(96, 64, 0), photo(64, 96, 1), photo(80, 80, 2)]
    metas = [{"p": [[0, 0, 50, 40], [20, 10, 90, 60]]}, {"p": []}, {"p": [[5, 5, 70, 70, 0.5]]}]
    e = embedder(proposals=[{"meta_field": "p"}], whole_image=True, mode=mode, crop_batch_size=3,
                 dense_image_size=64)
    together = e.predict(batch_of(*imgs, metas=metas), {})
    for i, img in enumerate(imgs):
        alone = e.predict(batch_of(img, metas=[metas[i]]), {})[0].regions
        r = together[i].regions
        assert np.array_equal(r.boxes, alone.boxes) and r.sources == alone.sources
        assert np.allclose(r.embeddings.astype(np.float32), alone.embeddings.astype(np.float32), atol=2e-3)
    assert [len(o.regions.boxes) for o in together] == [3, 1, 2]


# --------------------------------------------------------------- dense mode


def test_dense_pooling_on_a_known_feature_map():
    # channel 0 holds each cell's centre x, channel 1 its centre y (grid units),
    # channel 2 a constant; the image (160 x 80 px) covers 8 x 4 cells
    gh, gw = 4, 8
    ys, xs = torch.meshgrid(torch.arange(gh) + 0.5, torch.arange(gw) + 0.5, indexing="ij")
    feats = torch.stack([xs, ys, torch.ones(gh, gw)])
    boxes = torch.tensor([[40.0, 20, 120, 60], [0, 0, 160, 80]])  # grid [2,1]-[6,3] and the whole map
    got = pool_regions(feats, (4.0, 8.0), (80, 160), boxes, bins=4)
    for box, vec in zip(boxes, got):
        cx, cy = (box[0] + box[2]) / 2 / 20, (box[1] + box[3]) / 2 / 20
        expected = F.normalize(torch.tensor([cx, cy, 1.0]), dim=0)
        assert torch.allclose(vec, expected, atol=2e-2), (vec, expected)
    # a block of cells: features live at cell centres, so a box spanning the
    # block's cell centres (grid x 4.5-7.5, y 1.5-2.5) sees only the block ...
    block = torch.zeros(2, gh, gw)
    block[0] = 1.0
    block[1, 1:3, 4:8] = 5.0
    inner = pool_regions(block, (4.0, 8.0), (80, 160), torch.tensor([[90.0, 30, 150, 50]]), bins=4)[0]
    assert torch.allclose(inner, F.normalize(torch.tensor([1.0, 5.0]), dim=0), atol=1e-5)
    # ... and one over the block's cell edges mixes in its neighbours a little
    edges = pool_regions(block, (4.0, 8.0), (80, 160), torch.tensor([[80.0, 20, 160, 60]]), bins=4)[0]
    assert edges[1] / edges[0] < 5 and edges[1] / edges[0] > 3


def test_dense_mode_reuses_maskclip_features_exactly():
    mc = MaskCLIPTeacher(MaskCLIPConfig(**tiny_maskclip()), torch.device("cpu"), allow_random_init=True)
    imgs = [photo(96, 64, 5), photo(50, 70, 6)]
    metas = [{"p": [[0, 0, 60, 40], [30, 10, 90, 60]]}, {"p": [[10, 10, 40, 60]]}]
    ib = batch_of(*imgs, metas=metas)
    upstream = {"maskclip": mc.predict(ib, {})}
    shared = embedder(proposals=[{"meta_field": "p"}], mode="dense", dense_features_from="maskclip")
    own = embedder(proposals=[{"meta_field": "p"}], mode="dense", dense_image_size=64)
    a = shared.predict(ib, upstream)
    b = own.predict(ib, {})
    for x, y in zip(a, b):
        assert np.allclose(x.regions.embeddings.astype(np.float32), y.regions.embeddings.astype(np.float32),
                           atol=2e-3)
        assert x.regions.mode == "dense"
    wrong = embedder(arch_config={**TINY_CLIP, "embed_dim": 16}, proposals=[{"meta_field": "p"}], mode="dense",
                     dense_features_from="maskclip")
    with pytest.raises(RuntimeError, match="computed its features with"):
        wrong.predict(ib, upstream)


# ------------------------------------------------------------ tables, output


def test_regions_array_round_trips_through_the_writer_layout():
    e = embedder(proposals=[{"meta_field": "p"}], whole_image=True)
    outs = e.predict(batch_of(photo(), photo(70, 50, 1), metas=[{"p": [[1, 2, 30, 40]]}, {}]), {})
    arr = regions_array([[("v", outs[0].regions)], [], [("v", outs[1].regions)]])
    assert len(arr) == 3 and arr[1].as_py() == []
    first = arr[0].as_py()[0]
    assert first["dim"] == 32 and len(first["embeddings"]) == 2 * 32
    assert np.allclose(np.array(first["embeddings"], np.float32).reshape(2, 32),
                       outs[0].regions.embeddings.astype(np.float32))
    assert first["sources"] == ["json:p", "image"]  # equal scores keep their input order


def _vild_run(tmp_path, **vild):
    make_shards(tmp_path / "shards", 2, 4)
    out = str(tmp_path / "out")
    section = {"type": "vild", "pretrained": None, "arch_config": TINY_CLIP,
               "proposals": [{"teacher": "maskclip"}, {"meta_field": "proposals"}], "whole_image": True,
               "crop_batch_size": 16, **vild}
    cfg = load_config(run_config(str(tmp_path / "shards"), out, teachers=[tiny_maskclip(), section]))
    return cfg, out


def test_pipeline_writes_regions_that_load_back_with_their_boxes(tmp_path, ray_session):
    from labelmill.pipelines.label import run
    from labelmill.store.regions import RegionDataset, RegionReader, read_regions_ray

    cfg, out = _vild_run(tmp_path, nms_iou=1.0)
    summary = run(cfg)
    assert summary.counters.samples == 8 and summary.counters.error == 0

    table = pd.read_parquet(f"{out}/regions")  # a plain Parquet reader skips _manifest
    assert len(table) == 8 and table.key.is_unique
    assert set(table.teacher) == {"vild"} and set(table.weights_sha256) == {"random-init"}
    assert set(table["mode"]) == {"crop"} and set(table["pixel_scale"]) == {1.0}  # small photos: the originals
    from deltalake import DeltaTable

    labels = DeltaTable(f"{out}/labels").to_pandas()
    reader = RegionReader(out)
    assert sorted(reader.keys()) == sorted(table.key)
    for key in reader.keys():
        r = reader.get(key)
        assert r.embeddings.shape == (len(r.boxes), 32) and r.embeddings.dtype == np.float16
        assert np.allclose(np.linalg.norm(r.embeddings.astype(np.float32), axis=1), 1, atol=3e-3)
        w, h = r.meta["image_width"], r.meta["image_height"]
        assert np.allclose(r.boxes_norm, r.boxes / np.array([w, h, w, h]), atol=1e-6)
        assert r.sources[0] == "image" and set(r.sources) <= {"image", "maskclip"}
        # no filtering and no NMS here: the proposals are the image plus every maskclip box
        mine = labels[labels.key == key]
        want = {(0.0, 0.0, float(w), float(h))} | {
            (float(x), float(y), float(x + bw), float(y + bh)) for x, y, bw, bh in mine.bbox
        }
        assert {tuple(map(float, b)) for b in r.boxes} == want
        assert len(r.boxes) == 1 + len(mine)
        assert r.meta["mode"] == "crop" and r.meta["teacher"] == "vild"
        t = r.torch(torch.float32)
        assert t["embeddings"].dtype == torch.float32 and t["boxes"].shape == (len(r.boxes), 4)
    with pytest.raises(KeyError):
        reader.get("nope")

    # a training job's view: two ranks see every image exactly once between them
    seen = [item["key"] for rank in (0, 1) for item in RegionDataset(out, rank=rank, world_size=2)]
    assert sorted(seen) == sorted(table.key)
    assert read_regions_ray(out).count() == 8

    # re-running the same config adds no region rows
    run(cfg)
    assert len(RegionReader(out).keys()) == 8 and len(pd.read_parquet(f"{out}/regions")) == 8


def test_rows_record_the_resolution_their_crops_came_from(tmp_path, ray_session):
    from labelmill.pipelines.label import run

    make_shards(tmp_path / "shards", 1, 3)
    out = str(tmp_path / "out")
    section = {"type": "vild", "pretrained": None, "arch_config": TINY_CLIP, "whole_image": True,
               "proposals": [{"meta_field": "proposals"}], "work_short_side": 32, "work_max_long_side": 40}
    run(load_config(run_config(str(tmp_path / "shards"), out, teachers=[section])))
    table = pd.read_parquet(f"{out}/regions")
    assert len(table) == 3
    for row in table.itertuples():
        h, w = row.image_height, row.image_width
        want = min(1.0, 32 / min(h, w), 40 / max(h, w))
        assert row.pixel_scale == pytest.approx(want, rel=0.05), (h, w)
    assert (table.pixel_scale < 1).all()


def test_embeddings_from_the_pipeline_equal_the_teacher_called_directly(tmp_path, ray_session):
    from labelmill.pipelines.label import run
    from labelmill.store.regions import RegionReader

    cfg, out = _vild_run(tmp_path, proposals=[{"meta_field": "proposals"}])
    # give every sample external proposals through its JSON
    from helpers import encode
    from labelmill.io.shards import write_shard

    samples = []
    for i in range(4):
        img = photo(96, 64, 10 + i)
        props = [[5, 5, 60, 50, 0.9], [30, 0, 96, 64, 0.7]]
        samples.append((f"img{i}", {"png": encode(img, "PNG"), "txt": b"a photo",
                                    "json": json.dumps({"proposals": props}).encode()}))
    shards = tmp_path / "json_shards"
    shards.mkdir()
    write_shard(str(shards / "s-00000.tar"), samples)
    cfg = load_config({**cfg.model_dump(mode="json"), "input": {"shards": str(shards)}})
    run(cfg)
    reader = RegionReader(out)
    direct = ViLDEmbedder(cfg.teachers[1], torch.device("cpu"), allow_random_init=True)
    for i in range(4):
        img = photo(96, 64, 10 + i)
        want = direct.predict(batch_of(img, metas=[{"proposals": [[5, 5, 60, 50, 0.9], [30, 0, 96, 64, 0.7]]}]),
                              {})[0].regions
        got = reader.get(f"img{i}")
        assert np.array_equal(got.boxes, want.boxes)
        assert np.allclose(got.embeddings.astype(np.float32), want.embeddings.astype(np.float32), atol=2e-3)
        assert got.sources == ["image", "json:proposals", "json:proposals"]


def test_text_embedding_table_is_the_prompt_ensemble_classifier():
    import pyarrow.parquet as pq

    from labelmill.store.regions import text_embeddings_table

    table = text_embeddings_table("x", None, ["cat", "dog, puppy", "grass"], "short", arch_config=TINY_CLIP,
                                  allow_random_init=True)
    assert table.num_rows == 3 and table.column("class_name").to_pylist() == ["cat", "dog", "grass"]
    assert table.column("synonyms")[1].as_py() == ["dog", "puppy"]
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    mc = MaskCLIPTeacher(MaskCLIPConfig(**tiny_maskclip(vocabulary=["cat", "dog, puppy", "grass"],
                                                        templates="short")),
                         torch.device("cpu"), allow_random_init=True)
    assert np.allclose(emb, mc.classifier.numpy(), atol=1e-5)
    assert set(table.column("weights_sha256").to_pylist()) == {"random-init"}
    assert isinstance(table.schema.field("embedding").type, pa.FixedSizeListType)
    pq.write_table(table, "/dev/null")  # writable as it is
