"""The label stage split by where its work runs: prepare (CPU) -> infer (device) -> finish (CPU).

* Labels and regions equal, bit for bit, what the single label stage of
  commit 129ac6a gave (``tests/data/split_golden.parquet``, written by that
  code on the inputs and teachers below with one torch thread: MaskCLIP, GLIP
  in caption mode, ViLD crop with GLIP/MaskCLIP/JSON proposals, ViLD dense
  reusing MaskCLIP's features). The raw results cross an Arrow IPC round trip
  between infer and finish, as through Ray's object store.
* ``ray.decode: actor`` (bytes decoded in the device process) gives what the
  decode tasks give on CPU.
* A plug-in teacher without the split runs whole in infer; a failing forward
  batch is retried image by image; a host side that fails on one image makes
  only that image an error row.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import TINY_CLIP, encode, photo
from labelmill.config import FilterConfig
from labelmill.schemas.raw import RawBatch, raw_column
from labelmill.schemas.records import ImageRequest
from labelmill.schemas.tables import Col
from labelmill.stages.base import check_contract
from labelmill.stages.filter import FilterLabels
from labelmill.stages.finish import FinishLabels
from labelmill.stages.infer import InferImages
from labelmill.stages.prepare import PrepareInputs
from labelmill.teachers.base import validate_teacher_config

GOLDEN = Path(__file__).parent / "data" / "split_golden.parquet"
REQUEST = ImageRequest(short_side=64, max_long_side=128)
CAPTIONS = ["a dog on the grass", "two cats and a red car", "a png with alpha", "broken", None, "a bird \xff",
            "a grey road"]
MASKCLIP = {"type": "maskclip", "pretrained": None, "arch_config": TINY_CLIP,
            "vocabulary": ["cat", "dog", "grass", "sky", "road"], "templates": "single", "image_size": 64,
            "whole_max_long_side": 128, "logit_scale": 100.0}
GLIP = {"type": "glip", "architecture": "tiny", "tokenizer": "builtin-test", "min_size": 64, "max_size": 128,
        "score_floor": 0.0, "pre_nms_thresh": 0.0, "max_detections_per_image": 5}
VILD = {"type": "vild", "pretrained": None, "arch_config": TINY_CLIP, "work_short_side": 64, "work_max_long_side": 128,
        "proposals": [{"teacher": "glip", "min_score": 0.0}, {"teacher": "maskclip"}, {"meta_field": "p"}],
        "whole_image": True}
DENSE = {**VILD, "name": "dense", "mode": "dense", "dense_features_from": "maskclip"}
COMPARED = [Col.KEY, Col.ERROR, Col.WARNINGS, Col.CAPTION, Col.ORIG_H, Col.ORIG_W, Col.LABELS, Col.REGIONS]


def samples() -> pa.Table:
    rgba = np.dstack([photo(70, 90, seed=4), np.full((90, 70), 128, np.uint8)])
    imgs = [encode(photo(96, 64, seed=0)), encode(photo(300, 200, seed=1)), encode(rgba, "PNG"),
            b"not an image at all", encode(photo(80, 50, seed=9)), encode(photo(40, 30, seed=5)),
            encode(np.asarray(photo(120, 90, seed=6))[:, :, 0].copy(), "JPEG")]
    n = len(imgs)
    caps = [c.encode("utf-8", "surrogateescape") if c is not None else None for c in CAPTIONS]
    caps[5] = b"a bird \xff\xfe"
    return pa.table({
        Col.KEY: [f"k{i}" for i in range(n)], Col.SHARD: ["s.tar"] * n, Col.INDEX: list(range(n)),
        Col.IMAGE_BYTES: pa.array(imgs, pa.binary()), Col.IMAGE_EXT: ["jpg"] * n,
        Col.CAPTION_BYTES: pa.array(caps, pa.binary()),
        Col.META_JSON: [json.dumps({"i": i, "p": [[2, 2, 30, 20, 0.9]]}) for i in range(n)],
        Col.ERROR: pa.array([None] * n, pa.string()),
        Col.WARNINGS: pa.array([[] for _ in range(n)], pa.list_(pa.string())),
    })


def object_store(table: pa.Table) -> pa.Table:
    """An Arrow IPC round trip, as a block through Ray's object store."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def three_stages(sections, batch: pa.Table, batch_size: int = 3, decode: str = "tasks") -> pa.Table:
    cfgs = [validate_teacher_config(s) for s in sections]
    prepare = PrepareInputs(REQUEST, 10_000_000, teachers=cfgs, decode=decode == "tasks")
    infer = InferImages(cfgs, allow_random_init=True, batch_size=batch_size, cpus=1, gpus=0, device="cpu",
                        decode=decode, request=REQUEST, max_pixels=10_000_000)
    finish = FinishLabels(cfgs)
    infer.setup()
    finish.setup()
    stages = [prepare, infer, finish, FilterLabels(FilterConfig())]
    check_contract(stages, batch.column_names)
    prepared = object_store(prepare.process_batch(batch))
    inferred = object_store(infer.process_batch(prepared))
    return FilterLabels(FilterConfig()).process_batch(finish.process_batch(inferred))


@pytest.fixture
def one_thread(tmp_path, monkeypatch):
    """The golden file was written with one torch thread and an empty text-embedding cache (reductions differ
    in the last bit with more threads, and another test may have cached the same classifier with two)."""
    monkeypatch.setenv("LABELMILL_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_split_labels_equal_the_single_stage_bit_for_bit(one_thread):
    want = pq.read_table(GOLDEN)
    got = three_stages([MASKCLIP, GLIP, VILD, DENSE], samples())
    for col in COMPARED:
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    teachers = {lab["teacher"] for row in got.column(Col.LABELS).to_pylist() for lab in row}
    assert teachers == {"maskclip", "glip"}
    regions = {r["teacher"] for row in got.column(Col.REGIONS).to_pylist() for r in row}
    assert regions == {"vild", "dense"}
    assert not [c for c in got.column_names if c.startswith(("raw.", "prep."))]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_decode_in_actor_equals_decode_tasks_on_cpu(batch_size):
    """Same pixels (the probe teacher's label is their digest) at any batch size; same labels from the
    real teachers when both paths batch the same images (with decode=actor an undecodable image leaves
    its forward batch only once it is decoded, and batch composition alone moves floats in their last bit)."""
    batch = samples()
    probe = {"type": "plugin_teacher:ProbeTeacher"}
    sections = [probe, MASKCLIP, GLIP] if batch_size == 16 else [probe]
    want = three_stages(sections, batch, batch_size=batch_size)
    got = three_stages(sections, batch, batch_size=batch_size, decode="actor")
    assert sorted(got.column_names) == sorted(want.column_names)
    for col in COMPARED:
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    errors = dict(zip(want.column(Col.KEY).to_pylist(), want.column(Col.ERROR).to_pylist()))
    assert errors["k3"] and "undecodable" in errors["k3"] and sum(e is not None for e in errors.values()) == 1


def test_contracts_and_columns():
    cfgs = [validate_teacher_config(s) for s in (MASKCLIP, GLIP)]
    raw_cols = samples().column_names
    tasks = [PrepareInputs(REQUEST, 1, teachers=cfgs), InferImages(cfgs, allow_random_init=True, batch_size=2),
             FinishLabels(cfgs)]
    actor = [PrepareInputs(REQUEST, 1, teachers=cfgs, decode=False),
             InferImages(cfgs, allow_random_init=True, batch_size=2, decode="actor", request=REQUEST),
             FinishLabels(cfgs)]
    assert sorted(check_contract(tasks, raw_cols)) == sorted(check_contract(actor, raw_cols))
    assert tasks[1].produces[-2:] == (raw_column("maskclip"), raw_column("glip"))
    assert "prep.glip" in tasks[0].produces and "prep.maskclip" not in tasks[0].produces
    with pytest.raises(ValueError, match="needs the image request"):
        InferImages([], allow_random_init=True, batch_size=2, decode="actor")


def test_raw_batch_arrow_round_trip_and_empty_layouts():
    raw = RawBatch.from_counts({"a": np.arange(12.0).reshape(6, 2), "b": np.arange(3, dtype=np.int64)},
                               {"a": [2, 0, 4], "b": [1, 1, 1]}, [True, False, True])
    back = RawBatch.from_arrow(object_store(pa.table({"r": raw.to_arrow()})).column("r"))
    assert back.valid.tolist() == [True, False, True]
    assert np.array_equal(back.get("a", 2), np.arange(4.0, 12.0).reshape(4, 2)) and back.get("a", 1).shape == (0, 2)
    sliced = RawBatch.from_arrow(raw.to_arrow().slice(1, 2))
    assert sliced.valid.tolist() == [False, True] and np.array_equal(sliced.get("b", 1), [2])
    empty = RawBatch.empty({"a": (np.float64, (2,)), "b": (np.int64, ())}, 3)
    assert empty.to_arrow().type == raw.to_arrow().type and not empty.valid.any()
    assert np.array_equal(raw.take([2, 0]).get("a", 0), raw.get("a", 2))


def test_plugin_teacher_without_the_split_runs_whole_in_infer():
    """ProbeTeacher has only predict: its rows are built in infer; failures are retried image by image."""
    batch = samples()
    probe = {"type": "plugin_teacher:ProbeTeacher"}
    want = three_stages([probe], batch, batch_size=16)
    small = three_stages([{**probe, "batch_size": 2}], batch, batch_size=16)
    for col in COMPARED:
        assert small.column(col).to_pylist() == want.column(col).to_pylist(), col
    failing = three_stages([{**probe, "fail_on_key": "k1"}, MASKCLIP], batch, batch_size=3)
    keys = failing.column(Col.KEY).to_pylist()
    errs = dict(zip(keys, failing.column(Col.ERROR).to_pylist()))
    warns = dict(zip(keys, failing.column(Col.WARNINGS).to_pylist()))
    labels = dict(zip(keys, failing.column(Col.LABELS).to_pylist()))
    assert "cannot label k1" in errs["k1"] and labels["k1"] == []  # no partial labels, MaskCLIP's included
    for k in ("k0", "k2"):  # k1's forward batch: labelled alone, with a warning saying so
        assert errs[k] is None and [lab["teacher"] for lab in labels[k]][:1] == ["probeteacher"]
        assert any("batched forward failed" in w for w in warns[k])
    assert errs["k5"] is None and not any("batched forward failed" in w for w in warns["k5"])


def test_a_host_side_failure_is_one_error_row(monkeypatch):
    from labelmill.teachers.hosts import MaskCLIPHost

    real = MaskCLIPHost.encode

    def flaky(self, hw, stats, starts, values):
        if hw == (50, 80) or hw == (80, 50):  # k4, the EXIF-less 80x50 photo
            raise RuntimeError("cannot encode this one")
        return real(self, hw, stats, starts, values)

    monkeypatch.setattr(MaskCLIPHost, "encode", flaky)
    got = three_stages([MASKCLIP], samples())
    errs = dict(zip(got.column(Col.KEY).to_pylist(), got.column(Col.ERROR).to_pylist()))
    labels = dict(zip(got.column(Col.KEY).to_pylist(), got.column(Col.LABELS).to_pylist()))
    assert "teacher maskclip failed on the host" in errs["k4"] and labels["k4"] == []
    assert all(errs[k] is None and labels[k] for k in ("k0", "k1", "k2", "k5", "k6"))
