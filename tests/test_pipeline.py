"""End to end on local Ray: counts reconcile, outputs load everywhere, provenance, resume."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from helpers import encode, good_sample, gt_sample, gt_teacher, make_shards, photo, run_config
from labelmill.config import load_config
from labelmill.pipelines.label import run
from labelmill.io.shards import write_shard


def read(out, name):
    return DeltaTable(f"{out}/{name}").to_pandas().sort_values(["shard", "index"]).reset_index(drop=True)


def test_end_to_end_tiny_maskclip(tmp_path, ray_session):
    make_shards(tmp_path / "shards", 3, 5)
    out = str(tmp_path / "out")
    cfg = load_config(run_config(str(tmp_path / "shards"), out))
    summary = run(cfg)
    assert summary.counters.samples == 15 and summary.counters.shards_committed == 3
    c = summary.counters
    assert c.labelled + c.no_labels + c.error == 15 and c.error == 0

    samples = read(out, "samples")
    assert len(samples) == 15 and samples.groupby("shard").size().tolist() == [5, 5, 5]
    assert (samples.config_hash == cfg.label_hash()).all() and samples.run_id.nunique() == 1
    assert samples.caption.iloc[0] == "a red block on a gradient"
    assert (samples.image_width == 96).all() and (samples.image_height == 64).all()

    labels = read(out, "labels")
    assert len(labels) == samples.num_labels.sum() > 0
    assert set(labels.teacher) == {"maskclip"} and set(labels.weights_sha256) == {"random-init"}
    assert labels.weights.str.endswith("@random-init").all()
    assert labels.teacher_config_hash.nunique() == 1 and (labels.config_hash == cfg.label_hash()).all()

    # the same tables through plain-Parquet readers
    assert len(pd.read_parquet(f"{out}/labels")) == len(labels)
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/samples/*.parquet')").fetchall()[0][0]
    assert n == 15
    import ray.data

    assert ray.data.read_parquet(f"{out}/labels").count() == len(labels)
    assert ray.data.read_delta(f"{out}/samples").count() == 15

    # a second run finds everything committed and adds nothing
    again = run(cfg)
    assert again.shards_skipped == 3 and again.counters.samples == 0
    assert len(read(out, "samples")) == 15


def test_every_bad_input_is_a_row_with_its_reason(tmp_path, ray_session):
    import io
    import tarfile

    from PIL import Image

    cmyk = io.BytesIO()
    Image.fromarray(photo(40, 30)).convert("CMYK").save(cmyk, format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = io.BytesIO()
    Image.fromarray(photo(60, 20)).save(rotated, format="JPEG", exif=exif)
    samples = [
        good_sample("ok"),
        ("empty", {"jpg": b"", "txt": b"x"}),
        ("garbage", {"jpg": b"not an image", "txt": b"x"}),
        ("cmyk", {"jpg": cmyk.getvalue(), "txt": b"x"}),
        ("grey", {"png": encode(photo(40, 30)[..., 0], "PNG"), "txt": b"x"}),
        ("rgba", {"png": encode(photo(20, 20).repeat(1, 0)[:, :, :3], "PNG"), "txt": b"x"}),
        ("rotated", {"jpg": rotated.getvalue(), "txt": b"x"}),
        ("huge", {"png": encode(photo(400, 300), "PNG"), "txt": b"x"}),
        ("nocaption", {"jpg": encode(photo())}),
        ("latin1", {"jpg": encode(photo()), "txt": b"caf\xe9"}),
        ("dup", {"jpg": encode(photo()), "txt": b"first"}),
        ("other", {"jpg": encode(photo()), "txt": b"x"}),
        ("dup", {"jpg": encode(photo()), "txt": b"second"}),
        ("../escape", {"jpg": encode(photo()), "txt": b"x"}),
        ("dir/nested", {"jpg": encode(photo()), "txt": b"x"}),
        ("textonly", {"txt": b"no image"}),
    ]
    folder = tmp_path / "shards"
    write_shard(str(folder / "a.tar"), samples)
    whole = folder / "b.tar"
    write_shard(str(whole), [good_sample(f"t{i}") for i in range(3)])
    data = whole.read_bytes()
    whole.write_bytes(data[:5000])  # cut inside the second sample
    (folder / "c.tar").write_bytes(b"")          # 0-byte file: not even an empty tar
    write_shard(str(folder / "d.tar"), [])        # a valid tar without samples
    cfg = run_config(str(folder), str(tmp_path / "out"))
    cfg["input"]["max_image_pixels"] = 100_000
    summary = run(load_config(cfg))
    rows = read(str(tmp_path / "out"), "samples")
    c = summary.counters
    assert c.samples == len(rows) == c.labelled + c.no_labels + c.error
    by_key = {(r.shard.rsplit("/", 1)[1], r.key, r.index): r for r in rows.itertuples()}
    a = {k[1]: r for k, r in by_key.items() if k[0] == "a.tar" and k[1] != "dup"}

    def status(key):
        return a[key].status, "" if pd.isna(a[key].error) else a[key].error

    assert status("ok")[0] in ("labelled", "no_labels")
    assert "empty image file" in status("empty")[1]
    assert "not a recognised format" in status("garbage")[1]
    assert "too large" in status("huge")[1]
    assert "unsafe key" in status("../escape")[1]
    assert "no image member" in status("textonly")[1]
    for ok in ("cmyk", "grey", "rgba", "rotated", "nocaption", "latin1", "dir/nested", "other"):
        assert status(ok)[0] != "error", ok
    assert (a["rotated"].image_width, a["rotated"].image_height) == (20, 60)
    assert "missing caption" in a["nocaption"].warnings
    assert any("UTF-8" in w for w in a["latin1"].warnings)
    assert any("CMYK" in w for w in a["cmyk"].warnings)
    # a key seen before in the shard is no second sample: the first wins, the copy is counted
    (dup,) = [r for k, r in by_key.items() if k[1] == "dup"]
    assert pd.isna(dup.error) and dup.caption == "first"
    assert c.duplicates == 1 and DeltaTable(f"{tmp_path / 'out'}/stats").to_pandas().duplicates.sum() == 1
    assert len([k for k in by_key if k[0] == "a.tar"]) == len(samples) - 1
    assert not rows.duplicated(["shard", "key"]).any()
    b_rows = [r for k, r in by_key.items() if k[0] == "b.tar"]
    assert any("shard broken" in str(r.error) for r in b_rows)
    assert sum(pd.isna(r.error) for r in b_rows) >= 1
    (c_row,) = [r for k, r in by_key.items() if k[0] == "c.tar"]
    assert "shard broken" in c_row.error
    assert not any(k[0] == "d.tar" for k in by_key)
    # the sample-less shard is remembered as committed, so a rerun has nothing to do
    assert run(load_config(cfg)).shards_skipped == 4


def test_plugin_teacher_by_class_path_and_per_sample_failure(tmp_path, ray_session):
    folder = tmp_path / "shards"
    write_shard(str(folder / "a.tar"), [gt_sample(f"g{i}", seed=i) for i in range(6)])
    cfg = run_config(str(folder), str(tmp_path / "out"), teachers=[gt_teacher(fail_on_key="g3")])
    summary = run(load_config(cfg))
    rows = read(str(tmp_path / "out"), "samples")
    failed = rows[rows.key == "g3"].iloc[0]
    assert failed.status == "error" and "cannot label g3" in failed.error
    assert summary.counters.labelled == 5 and summary.counters.error == 1
    # the images of the failed batch that succeeded alone say so
    ok = rows[rows.key != "g3"]
    assert all(any("batched forward failed" in w and "labelled alone" in w for w in ws) for ws in ok.warnings)
    labels = read(str(tmp_path / "out"), "labels")
    assert set(labels.teacher) == {"gt"} and set(labels.teacher_type) == {"plugin_teacher:GroundTruthTeacher"}
    assert len(labels) == 10 and (labels.weights == "ground-truth").all()

    from labelmill.export.report import write_report

    html = (tmp_path / "report.html")
    write_report(str(tmp_path / "out"), str(html), max_images=4)
    text = html.read_text()
    assert text.count("<figure") == 4 and text.count("data:image/png;base64,") == 4
    assert "cannot label g3" in text and "RANDOM WEIGHTS" not in text
    for name in set(labels.class_name):
        assert f"<td>{name}</td>" in text
    # every image, paged: 5 usable images, 2 to a page, linked to each other
    write_report(str(tmp_path / "out"), str(html), max_images=None, per_page=2)
    pages = [html, tmp_path / "report-2.html", tmp_path / "report-3.html"]
    assert [p.read_text().count("<figure") for p in pages] == [2, 2, 1]
    assert not (tmp_path / "report-4.html").exists()
    assert "Images 5-5 of 5" in pages[2].read_text() and "<a href='report-2.html'>previous</a>" in pages[2].read_text()
    assert "<a href='report-2.html'>next</a>" in pages[0].read_text() and "cannot label g3" not in pages[1].read_text()


def test_unreadable_shard_is_failed_not_done_and_the_next_run_retries_it(tmp_path, ray_session, monkeypatch,
                                                                        capsys):
    import yaml

    import labelmill.pipelines.label as label_pipeline
    from labelmill.cli import main
    from labelmill.exitcodes import EXIT_FAILED_SHARDS

    folder = tmp_path / "shards"
    paths = make_shards(folder, 2, 3)
    gone, kept = paths[1], tmp_path / "kept.tar"
    cfg = run_config(str(folder), str(tmp_path / "out"))
    cfg["input"].update(read_attempts=2, read_backoff_s=0)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    listing = label_pipeline.list_shard_fingerprints

    def list_then_lose(*args, **kwargs):  # the store loses the shard between listing and reading
        infos = listing(*args, **kwargs)
        (folder / gone.rsplit("/", 1)[1]).rename(kept)
        return infos

    monkeypatch.setattr(label_pipeline, "list_shard_fingerprints", list_then_lose)
    assert main(["run", str(cfg_path)]) == EXIT_FAILED_SHARDS
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert list(summary["failed_shards"]) == [gone] and summary["samples"] == 3
    assert "failed shard" in captured.err and gone in captured.err
    rows = read(str(tmp_path / "out"), "samples")
    assert set(rows.shard) == {paths[0]}  # nothing of the failed shard is final

    monkeypatch.setattr(label_pipeline, "list_shard_fingerprints", listing)
    kept.rename(gone)
    assert main(["run", str(cfg_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed_shards"] == {} and summary["shards_skipped_already_committed"] == 1
    rows = read(str(tmp_path / "out"), "samples")
    assert sorted(rows.shard) == sorted([paths[0]] * 3 + [gone] * 3) and rows.error.isna().all()
