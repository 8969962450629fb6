"""The refresh planner: every shard classified, and filter re-application proven exact."""

from __future__ import annotations

import random

import pytest

from helpers import run_config, tiny_maskclip
from labelmill.io.shards import Fingerprint
from labelmill.store.refresh_plan import (
    CommittedShard,
    LabelInputs,
    filter_reapply,
    plan_refresh,
    teacher_hash,
)

FILTER = {"min_score": 0.3, "per_class_min_score": {"cat": 0.5}, "min_area": 0.0, "max_labels_per_image": None}
TODAY = LabelInputs(teachers={"maskclip": "m1", "glip": "g1"}, shared="s1", filter=FILTER)


def fp(size: int, etag: str = "e") -> Fingerprint:
    return Fingerprint(size=size, etag=etag)


def committed(size: int, inputs: LabelInputs = TODAY, etag: str = "e", **kw) -> CommittedShard:
    return CommittedShard(fingerprint=fp(size, etag), inputs=inputs, **kw)


def with_(base: LabelInputs = TODAY, **changes) -> LabelInputs:
    return LabelInputs(teachers=changes.get("teachers", base.teachers), shared=changes.get("shared", base.shared),
                       filter=changes.get("filter", base.filter))


def test_each_status_and_action():
    listing = {"s3://b/new.tar": fp(1), "s3://b/same.tar": fp(2), "s3://b/rewritten.tar": fp(3, "e2"),
               "s3://b/old-teacher.tar": fp(4), "s3://b/stricter.tar": fp(5), "s3://b/looser.tar": fp(6)}
    old = {
        "s3://b/same.tar": committed(2),
        "s3://b/rewritten.tar": committed(3, etag="e1", inputs=with_(teachers={"maskclip": "m0", "glip": "g1"})),
        "s3://b/old-teacher.tar": committed(4, inputs=with_(teachers={"maskclip": "m0", "glip": "g1"})),
        "s3://b/stricter.tar": committed(5, inputs=with_(filter=dict(FILTER, min_score=0.2))),
        "s3://b/looser.tar": committed(6, inputs=with_(filter=dict(FILTER, min_score=0.4))),
        "s3://b/gone.tar": committed(7),
    }
    plan = plan_refresh(listing, old, TODAY)
    got = {p.shard.rsplit("/", 1)[1]: (p.status, p.action) for p in plan.shards}
    assert got == {
        "new.tar": ("new", "label"),
        "same.tar": ("unchanged", "skip"),
        "rewritten.tar": ("changed", "replace"),  # changed wins over stale
        "old-teacher.tar": ("stale", "relabel"),
        "stricter.tar": ("stale", "refilter"),
        "looser.tar": ("stale", "relabel"),
        "gone.tar": ("deleted", "remove"),
    }
    assert [p.shard for p in plan.shards][:6] == list(listing)  # listing order, deleted last
    assert plan.counts == {"new": 1, "unchanged": 1, "changed": 1, "deleted": 1, "stale": 3}
    assert plan.to_label == ["s3://b/new.tar", "s3://b/rewritten.tar", "s3://b/old-teacher.tar", "s3://b/looser.tar"]
    assert sorted(plan.to_remove) == sorted(["s3://b/rewritten.tar", "s3://b/old-teacher.tar",
                                              "s3://b/stricter.tar", "s3://b/looser.tar", "s3://b/gone.tar"])
    assert plan.to_refilter == ["s3://b/stricter.tar"]
    assert not plan.nothing_to_do and plan.summary()["actions"]["refilter"] == 1
    stale = {p.shard: p for p in plan.shards if p.status == "stale"}
    assert stale["s3://b/old-teacher.tar"].teachers == ("maskclip",)
    assert "teacher changed: maskclip" in stale["s3://b/old-teacher.tar"].reason
    assert "lower score threshold" in stale["s3://b/looser.tar"].reason


def test_nothing_to_do_and_empty_output():
    listing = {f"/d/{i}.tar": fp(i) for i in range(5)}
    plan = plan_refresh(listing, {u: committed(f.size) for u, f in listing.items()}, TODAY)
    assert plan.nothing_to_do and plan.counts["unchanged"] == 5 and not plan.to_label and not plan.to_remove
    first = plan_refresh(listing, {}, TODAY)
    assert first.counts["new"] == 5 and first.to_label == list(listing) and not first.to_remove


def test_teacher_added_removed_and_shared_settings_relabel():
    listing = {"/d/a.tar": fp(1)}
    for before, expect in [
        (with_(teachers={"maskclip": "m1"}), "teacher added: glip"),
        (with_(teachers={"maskclip": "m1", "glip": "g1", "vild": "v1"}), "teacher removed: vild"),
        (with_(teachers={"maskclip": "m1", "glip": "g0"}), "teacher changed: glip"),
        (with_(shared="s0"), "shared label settings changed"),
        (with_(shared="s0", filter=dict(FILTER, min_score=0.1)), "shared label settings changed"),
    ]:
        (p,) = plan_refresh(listing, {"/d/a.tar": committed(1, inputs=before)}, TODAY).shards
        assert (p.status, p.action) == ("stale", "relabel") and expect in p.reason, (before, p)


def test_fingerprint_without_common_field_is_changed():
    listing = {"/d/a.tar": Fingerprint(1, mtime="2.0")}
    old = {"/d/a.tar": CommittedShard(Fingerprint(1, etag="x"), TODAY)}
    assert plan_refresh(listing, old, TODAY).shards[0].status == "changed"


@pytest.mark.parametrize(
    "old,new,kw,possible,why",
    [
        ({}, {}, {}, True, "unchanged"),
        (FILTER, dict(FILTER, min_score=0.4), {}, True, "stricter"),
        (FILTER, dict(FILTER, min_score=0.2), {}, False, "min_score"),
        (FILTER, dict(FILTER, per_class_min_score={"cat": 0.4}), {}, False, "'cat'"),
        (FILTER, dict(FILTER, per_class_min_score={}), {}, False, "'cat'"),  # cat falls back to 0.3 < 0.5
        (FILTER, dict(FILTER, per_class_min_score={"cat": 0.5, "dog": 0.2}), {}, False, "'dog'"),
        (FILTER, dict(FILTER, per_class_min_score={"cat": 0.5, "dog": 0.6}), {}, True, "stricter"),
        (FILTER, dict(FILTER, min_area=10.0), {}, True, "stricter"),
        (dict(FILTER, min_area=10.0), FILTER, {}, False, "min_area"),
        (dict(FILTER, min_area=10.0), dict(FILTER, min_area=10.0, min_score=0.4), {}, False, "small-area"),
        (dict(FILTER, min_area=10.0), dict(FILTER, min_area=10.0, min_score=0.4), {"dropped_small_area": 0},
         True, "stricter"),
        (dict(FILTER, max_labels_per_image=5), dict(FILTER, max_labels_per_image=3), {}, True, "stricter"),
        (dict(FILTER, max_labels_per_image=5), dict(FILTER, max_labels_per_image=8), {}, False, "higher cap"),
        (dict(FILTER, max_labels_per_image=5), dict(FILTER, max_labels_per_image=8), {"dropped_over_max": 0},
         True, "stricter"),
        (dict(FILTER, max_labels_per_image=5), dict(FILTER, max_labels_per_image=None), {"dropped_over_max": 2},
         False, "higher cap"),
        (dict(FILTER, max_labels_per_image=5), dict(FILTER, max_labels_per_image=5, min_score=0.4), {}, False,
         "past the cut"),
        (FILTER, dict(FILTER, mystery=1), {}, False, "unknown filter settings"),
    ],
)
def test_filter_reapply_rules(old, new, kw, possible, why):
    verdict = filter_reapply(old, new, **kw)
    assert verdict.possible is possible and why in verdict.reason, verdict


def _random_filter(rng: random.Random) -> dict:
    return {
        "min_score": rng.choice([0.0, 0.2, 0.4, 0.6]),
        "per_class_min_score": rng.choice([{}, {"cat": 0.5}, {"cat": 0.3, "dog": 0.7}, {"dog": 0.1}]),
        "min_area": rng.choice([0.0, 20.0, 50.0]),
        "max_labels_per_image": rng.choice([None, 2, 4, 6]),
    }


def _tightened(old: dict, rng: random.Random) -> dict:
    new = dict(old, per_class_min_score=dict(old["per_class_min_score"]))
    knob = rng.choice(["min_score", "class", "area", "cap", "none"])
    if knob == "min_score":
        new["min_score"] = min(1.0, old["min_score"] + rng.choice([0.1, 0.3]))
    elif knob == "class":
        new["per_class_min_score"][rng.choice(["cat", "dog", "sky"])] = rng.choice([0.5, 0.8, 0.95])
    elif knob == "area":
        new["min_area"] = old["min_area"] + rng.choice([10.0, 40.0])
    elif knob == "cap":
        new["max_labels_per_image"] = rng.choice([1, 2, 3])
    return new


def test_a_reapplied_filter_matches_a_from_scratch_filter_exactly():
    """Brute force: wherever filter_reapply says yes, old-kept labels + new filter == new filter from scratch,
    labels (in order) and drop counters (old counters + counters of the re-application)."""
    from labelmill.config import FilterConfig
    from labelmill.stages.filter import filter_labels

    rng = random.Random(0)
    checked = refused = 0
    for trial in range(600):
        images = []
        for i in range(6):
            images.append([{"id": (i, j), "class_name": rng.choice(["cat", "dog", "sky", None]), "phrase": "thing",
                            "score": round(rng.random(), 2), "area": float(rng.choice([5, 30, 80]))}
                           for j in range(rng.randint(0, 9))])
        old = _random_filter(rng)
        new = _random_filter(rng) if trial % 2 else _tightened(old, rng)
        old_cfg, new_cfg = FilterConfig(**old), FilterConfig(**new)
        stored = [filter_labels([dict(x) for x in labs], old_cfg) for labs in images]
        small = sum(counts["dropped_small_area"] for _, counts in stored)
        over = sum(counts["dropped_over_max"] for _, counts in stored)
        verdict = filter_reapply(old, new, dropped_small_area=small, dropped_over_max=over)
        if not verdict.possible:
            refused += 1
            continue
        checked += 1
        for labs, (kept_old, counts_old) in zip(images, stored):
            scratch, scratch_counts = filter_labels([dict(x) for x in labs], new_cfg)
            again, again_counts = filter_labels([dict(x) for x in kept_old], new_cfg)
            assert [x["id"] for x in again] == [x["id"] for x in scratch], (trial, old, new, verdict)
            assert {k: counts_old[k] + again_counts[k] for k in counts_old} == scratch_counts, (trial, old, new)
    assert checked > 60 and refused > 60  # both branches really exercised


def test_label_inputs_follow_the_config_label_hash(tmp_path):
    """Whatever changes RunConfig.label_hash changes LabelInputs, in the right part; the rest changes neither."""
    from labelmill.config import load_config

    base = run_config(str(tmp_path), str(tmp_path / "out"))
    ref = load_config(base)
    inputs = LabelInputs.from_config(ref)
    assert set(inputs.teachers) == {"maskclip"} and inputs.filter["min_score"] == 0.0

    def variant(**section) -> tuple:
        cfg = load_config({**base, **section})
        return cfg.label_hash() != ref.label_hash(), LabelInputs.from_config(cfg)

    moved, other = variant(teachers=[tiny_maskclip(image_size=96)])
    assert moved and other.teachers["maskclip"] != inputs.teachers["maskclip"] and other.shared == inputs.shared
    moved, other = variant(filter={"min_score": 0.5})
    assert moved and other.teachers == inputs.teachers and not other.filter_equal(inputs)
    moved, other = variant(input={"shards": str(tmp_path), "max_image_pixels": 1000})
    assert moved and other.shared != inputs.shared and other.teachers == inputs.teachers
    moved, other = variant(allow_random_init=False)
    assert moved and other.shared != inputs.shared
    moved, other = variant(ray={"batch_size": 3}, output={"path": str(tmp_path / "elsewhere")})
    assert not moved and other == inputs
    # a weights hash, when known, is part of the teacher's identity
    weighed = LabelInputs.from_config(ref, {"maskclip": "abc"})
    assert weighed.teachers["maskclip"] != inputs.teachers["maskclip"]
    assert LabelInputs.from_dict(weighed.to_dict()) == weighed
    assert teacher_hash("h", "w") != teacher_hash("h", None) and teacher_hash("h", None) == teacher_hash("h", "")


def test_ten_thousand_shards_plan_in_one_pass():
    listing = {f"s3://b/{i:05d}.tar": fp(i) for i in range(10_000)}
    old = {u: committed(f.size) for u, f in listing.items()}
    del old["s3://b/00010.tar"]
    old["s3://b/00011.tar"] = committed(11, etag="other")
    old["s3://b/zz.tar"] = committed(1)
    plan = plan_refresh(listing, old, TODAY)
    assert plan.counts == {"new": 1, "unchanged": 9_998, "changed": 1, "deleted": 1, "stale": 0}


def test_shared_inputs_are_decided_per_drop_totals():
    """One inputs object for many shards (as a version record gives): drop totals still decide per shard."""
    old_inputs = with_(filter=dict(FILTER, max_labels_per_image=5))
    today = with_(filter=dict(FILTER, max_labels_per_image=8))
    listing = {f"/d/{i}.tar": fp(i) for i in range(4)}
    old = {u: committed(f.size, inputs=old_inputs, dropped_over_max=(3 if u == "/d/2.tar" else 0))
           for u, f in listing.items()}
    plan = plan_refresh(listing, old, today)
    assert [p.action for p in plan.shards] == ["refilter", "refilter", "relabel", "refilter"]
