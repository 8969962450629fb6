"""A run whose teacher keeps nothing says why, and its tables exist (empty) for every reader."""

from __future__ import annotations

import io

from helpers import make_shards, run_config

import labelmill.data
from labelmill.config import load_config
from labelmill.pipelines.label import run


def test_a_teacher_that_keeps_nothing_gets_a_line_and_the_tables_exist_empty(tmp_path, ray_session):
    import deltalake

    make_shards(tmp_path / "shards", 1, 3)
    out = tmp_path / "out"
    stream = io.StringIO()
    summary = run(load_config(run_config(str(tmp_path / "shards"), str(out), filter={"min_score": 1.0})),
                  stream=stream)
    assert summary.counters.labels_kept == 0 and summary.counters.samples == 3
    (note,) = summary.notes
    assert note.startswith("teacher maskclip kept no labels:") and "below filter.min_score 1" in note
    assert "best score" in note and f"[labelmill] {note}" in stream.getvalue()
    assert summary.as_dict()["notes"] == [note]
    # every table with a fixed schema exists from the first commit, empty where nothing had rows
    ds = labelmill.data.open(str(out))
    assert ds.read("labels").num_rows == 0 and ds.read("samples").num_rows == 3
    assert deltalake.DeltaTable(str(out / "labels")).to_pyarrow_table().num_rows == 0
    # the README's version-aware reads, as written there
    import duckdb

    got = duckdb.sql(f"select status, count(*) from read_parquet({ds.files('samples')}) group by 1").fetchall()
    assert sum(n for _, n in got) == 3
    pinned = deltalake.DeltaTable(str(out / "labels"), version=ds.record["table_versions"]["labels"])
    assert pinned.to_pandas().empty


def test_kept_nothing_names_the_teachers_own_cut_when_nothing_reached_the_filter():
    from types import SimpleNamespace

    from labelmill.engine.summary import kept_nothing
    from labelmill.store.yields import ScoreHist

    glip = SimpleNamespace(instance_name="glip", score_floor=0.05, pre_nms_thresh=None)
    mask = SimpleNamespace(instance_name="maskclip")
    cfg = SimpleNamespace(teachers=[glip, mask], filter=SimpleNamespace(min_score=0.3, per_class_min_score={}))
    hist = ScoreHist()
    hist.add_image([("maskclip", "cat", 0.9, True)])
    lines = kept_nothing(cfg, hist, samples=4)
    assert lines == ["teacher glip kept no labels: none reached the filter; its own cut (score_floor 0.05) "
                     "stopped them all"]
    low = ScoreHist()
    low.add_image([("maskclip", "cat", 0.12, True), ("glip", "a dog", 0.07, True)])
    assert kept_nothing(cfg, low, samples=4) == [
        "teacher glip kept no labels: 1 before the filter, best score 0.05-0.10, below filter.min_score 0.3",
        "teacher maskclip kept no labels: 1 before the filter, best score 0.10-0.15, below filter.min_score 0.3"]
    assert kept_nothing(cfg, ScoreHist(), samples=0) == []
