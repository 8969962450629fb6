"""The label actor's pipeline and its decode-in-actor option (no Ray needed).

``ray.decode: actor`` sends raw bytes to the label actor, which decodes each
forward batch itself.  On CPU it must give exactly what today's path (decode
tasks, then the label stage) gives: same pixels reach the teacher, same
original sizes, captions, warnings and errors.
"""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import encode, photo
from labelmill.schemas.records import ImageRequest
from labelmill.schemas.tables import Col
from labelmill.stages.decode import DecodeImages
from labelmill.stages.label import LabelImages
from labelmill.teachers.base import validate_teacher_config

REQUEST = ImageRequest(short_side=64, max_long_side=128)


def exif_rotated_jpeg() -> bytes:
    from PIL import Image
    import io

    img = Image.fromarray(photo(80, 50, seed=9))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def raw_batch() -> pa.Table:
    rgba = np.dstack([photo(70, 90, seed=4), np.full((90, 70), 128, np.uint8)])
    samples = [
        ("k0", encode(photo(96, 64, seed=0)), b"a dog"),
        ("k1", encode(photo(300, 200, seed=1)), b"two cats"),  # downscaled (JPEG draft + resize)
        ("k2", encode(rgba, "PNG"), b"a png with alpha"),
        ("k3", b"not an image at all", b"broken"),
        ("k4", exif_rotated_jpeg(), None),  # no caption
        ("k5", encode(photo(40, 30, seed=5)), b"\xff\xfe bad utf8"),
        ("k6", encode(np.asarray(photo(120, 90, seed=6))[:, :, 0].copy(), "JPEG"), b"grey"),
    ]
    n = len(samples)
    return pa.table(
        {
            Col.KEY: [s[0] for s in samples],
            Col.SHARD: ["s.tar"] * n,
            Col.IMAGE_BYTES: pa.array([s[1] for s in samples], pa.binary()),
            Col.IMAGE_EXT: ["jpg"] * n,
            Col.CAPTION_BYTES: pa.array([s[2] for s in samples], pa.binary()),
            Col.META_JSON: [json.dumps({"i": i}) for i in range(n)],
            Col.ERROR: pa.array([None] * n, pa.string()),
            Col.WARNINGS: pa.array([[] for _ in range(n)], pa.list_(pa.string())),
        }
    )


def label_stage(decode: str, stage_batch: int, **probe) -> LabelImages:
    cfg = validate_teacher_config({"type": "plugin_teacher:ProbeTeacher", **probe})
    stage = LabelImages(
        [cfg], allow_random_init=True, batch_size=stage_batch, cpus=1, gpus=0, torch_threads=None,
        device="cpu", decode=decode, request=REQUEST, max_pixels=10_000_000,
    )
    stage.setup()
    return stage


def today(batch: pa.Table, stage_batch: int = 3, **probe) -> pa.Table:
    decoded = DecodeImages(REQUEST, 10_000_000, cpus=1).process_batch(batch)
    return label_stage("tasks", stage_batch, **probe).process_batch(decoded)


COMPARED = [Col.KEY, Col.ERROR, Col.WARNINGS, Col.CAPTION, Col.ORIG_H, Col.ORIG_W, Col.LABELS, Col.REGIONS]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_decode_in_actor_equals_decode_tasks_on_cpu(batch_size):
    batch = raw_batch()
    want = today(batch)
    got = label_stage("actor", batch_size).process_batch(batch)
    assert sorted(got.column_names) == sorted(want.column_names)
    for col in COMPARED:
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    errors = dict(zip(want.column(Col.KEY).to_pylist(), want.column(Col.ERROR).to_pylist()))
    assert errors["k3"] and "undecodable" in errors["k3"] and sum(e is not None for e in errors.values()) == 1
    labels = dict(zip(want.column(Col.KEY).to_pylist(), want.column(Col.LABELS).to_pylist()))
    digests = {k: v[0]["class_name"] for k, v in labels.items() if v}
    assert len(set(digests.values())) == 6  # six decodable images, six different pixel arrays
    h, w = want.column(Col.ORIG_H).to_pylist()[4], want.column(Col.ORIG_W).to_pylist()[4]
    assert (h, w) == (80, 50)  # the EXIF rotation reached both paths


def test_actor_decode_contract_replaces_the_decode_stage():
    from labelmill.stages.base import check_contract

    raw_cols = raw_batch().column_names
    actor = LabelImages([], allow_random_init=True, batch_size=2, cpus=1, gpus=0, torch_threads=None,
                        decode="actor", request=REQUEST)
    tasks = LabelImages([], allow_random_init=True, batch_size=2, cpus=1, gpus=0, torch_threads=None)
    assert sorted(check_contract([actor], raw_cols)) == sorted(
        check_contract([DecodeImages(REQUEST, 1, 1), tasks], raw_cols)
    )
    with pytest.raises(ValueError, match="needs the image request"):
        LabelImages([], allow_random_init=True, batch_size=2, cpus=1, gpus=0, torch_threads=None, decode="actor")


def test_pipelined_failures_and_teacher_batch_size():
    """A failing forward batch is retried image by image inside the pipeline; the teacher's
    own batch_size cuts the stage's batches; outputs do not depend on either."""
    batch = raw_batch()
    want = today(batch, stage_batch=16)
    small = label_stage("tasks", 16, batch_size=2)
    decoded = DecodeImages(REQUEST, 10_000_000, cpus=1).process_batch(batch)
    out = small.process_batch(decoded)
    for col in COMPARED:
        assert out.column(col).to_pylist() == want.column(col).to_pylist(), col

    failing = today(batch, stage_batch=3, fail_on_key="k1")
    keys = failing.column(Col.KEY).to_pylist()
    errs = dict(zip(keys, failing.column(Col.ERROR).to_pylist()))
    warns = dict(zip(keys, failing.column(Col.WARNINGS).to_pylist()))
    labels = dict(zip(keys, failing.column(Col.LABELS).to_pylist()))
    assert "cannot label k1" in errs["k1"] and labels["k1"] == []
    # k0 and k2 shared k1's forward batch: labelled alone, with a warning saying so
    for k in ("k0", "k2"):
        assert errs[k] is None and len(labels[k]) == 1
        assert any("batched forward failed" in w for w in warns[k])
    assert errs["k5"] is None and not any("batched forward failed" in w for w in warns["k5"])


def test_host_copy_and_device_tensor_round_trip():
    from labelmill.models.transfer import DeviceTensor, HostCopy

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    on = DeviceTensor(x, dev).get()
    assert on.device.type == dev.type
    back = HostCopy(on * 2).get()
    assert back.device.type == "cpu" and torch.equal(back, x * 2)
