"""`labelmill versions` as text: columns line up for every kind, and a rollback shows no row counts."""

from __future__ import annotations

from labelmill.store.versions import format_versions


def _row(version: int, kind: str, labels: int, rolled_back_to: int | None = None) -> dict:
    return {"version": version, "time": f"2026-12-0{version}T02:30:00+00:00", "kind": kind,
            "shards": {"new": 1, "changed": 0, "deleted": 0, "stale": 0}, "shards_total": 3,
            "rows_added": {} if rolled_back_to else {"labels": labels, "samples": 10},
            "teachers": {"maskclip": "abcdef0123456789"}, "seconds": 1.25, "rolled_back_to": rolled_back_to,
            "readable": True}


def test_versions_table_aligns_and_a_rollback_adds_no_rows():
    text = format_versions([_row(1, "commit", 1234), _row(2, "refresh", 56), _row(3, "rollback", 0, 1)])
    head, *rows = text.splitlines()
    end = head.index("labels+") + len("labels+")
    for line in rows:
        assert line[end - 1] != " " and line[end] == " ", line  # right-aligned under the header
    assert rows[0][:end].rstrip().endswith("1234") and rows[1][:end].rstrip().endswith("56")
    assert "rollback->1" in rows[2] and rows[2][:end].rstrip().endswith("-")
    assert [ln.index("maskclip:") for ln in rows] == [head.index("teachers")] * 3
