"""Shard listing and tar reading, including every malformed-shard case."""

from __future__ import annotations

import io
import tarfile

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from helpers import good_sample, make_shards
from labelmill.io.shards import ShardListError, ShardUnavailable, iter_shard, list_shards, unsafe_key_reason, write_shard


def test_listing_forms(tmp_path):
    paths = make_shards(tmp_path / "d", 3, 1)
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    assert list_shards(str(tmp_path / "d")) == paths
    assert list_shards(str(tmp_path / "d" / "*.tar")) == paths
    assert list_shards(str(tmp_path / "d" / "shard-{00000..00001}.tar")) == paths[:2]
    assert list_shards([paths[2], paths[0], paths[2]]) == [paths[2], paths[0]]


def test_listing_nothing_is_an_error(tmp_path):
    with pytest.raises(ShardListError, match="matches no shard"):
        list_shards(str(tmp_path / "missing-*.tar"))
    with pytest.raises(ShardListError):
        list_shards(str(tmp_path))


def test_samples_are_grouped_by_key(tmp_path):
    path = write_shard(str(tmp_path / "a.tar"), [good_sample("x1"), good_sample("x2", caption="two")])
    rows = list(iter_shard(path))
    assert [(r.key, r.index, r.error) for r in rows] == [("x1", 0, None), ("x2", 1, None)]
    assert rows[1].caption == b"two" and rows[1].image_ext == "jpg" and '"seed"' in rows[1].meta


def test_invalid_json_sidecars_are_kept_with_a_warning(tmp_path):
    _, good = good_sample("a")
    samples = [
        ("ok", good),
        ("broken", {**good, "json": b'{"seed": 1,'}),
        ("listy", {**good, "json": b"[1, 2]"}),
    ]
    rows = {r.key: r for r in iter_shard(write_shard(str(tmp_path / "j.tar"), samples))}
    assert rows["ok"].warnings == []
    assert rows["broken"].meta == '{"seed": 1,' and rows["broken"].error is None
    assert any("broken.json is not valid JSON" in w for w in rows["broken"].warnings)
    assert any("listy.json is JSON but not an object" in w for w in rows["listy"].warnings)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "cut, broken_key, first_ok",
    [
        (4200, "", True),    # inside a.txt's padding: 'a' is whole, the next header breaks
        (6000, "b", True),   # inside b.jpg's data: 'a' is whole, 'b' is the error row
        (2000, "a", False),  # inside a.jpg's data: 'a' itself is cut
    ],
)
def test_truncated_tar_keeps_complete_samples_and_reports_the_break(tmp_path, cut, broken_key, first_ok):
    full = _tar_bytes([("a.jpg", b"A" * 3000), ("a.txt", b"cap"), ("b.jpg", b"B" * 3000), ("b.txt", b"cap")])
    path = tmp_path / "cut.tar"
    path.write_bytes(full[:cut])
    rows = list(iter_shard(str(path)))
    if first_ok:
        assert rows[0].key == "a" and rows[0].error is None and rows[0].caption == b"cap"
        assert len(rows) == 2
    else:
        assert len(rows) == 1
    assert rows[-1].key == broken_key and "shard broken" in rows[-1].error
    assert [r.index for r in rows] == list(range(len(rows)))


def test_garbage_file_is_one_error_row(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 200)
    rows = list(iter_shard(str(bad)))
    assert len(rows) == 1 and rows[0].error


def test_missing_shard_is_unavailable_not_an_error_row(tmp_path):
    # a shard missing (or unreachable) is the storage's fault: retried, then failed; never a final error row
    sleeps = []
    with pytest.raises(ShardUnavailable, match="after 3 attempts.*FileNotFoundError"):
        list(iter_shard(str(tmp_path / "nope.tar"), attempts=3, backoff_s=0.5, sleep=sleeps.append))
    assert sleeps == [0.5, 1.0]  # exponential backoff between the tries


class FlakyFS(LocalFileSystem):
    """Local files through a store that fails: the first ``fail_opens`` opens raise, and the first
    ``drop_reads`` opened handles drop the connection after ``drop_after`` bytes."""

    protocol = "flaky"
    fail_opens = 0
    drop_reads = 0
    drop_after = 0
    opens = 0

    def _open(self, path, mode="rb", **kwargs):
        cls = type(self)
        cls.opens += 1
        if cls.fail_opens > 0:
            cls.fail_opens -= 1
            raise FileNotFoundError(f"{path} (not there for a moment)")
        fh = super()._open(path, mode, **kwargs)
        if cls.drop_reads > 0:
            cls.drop_reads -= 1
            return _Dropping(fh, cls.drop_after)
        return fh

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).removeprefix("flaky://"))


class _Dropping(io.RawIOBase):
    def __init__(self, fh, limit):
        self.fh, self.left = fh, limit

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = self.fh.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.fh.close()
        super().close()


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.fail_opens = FlakyFS.drop_reads = FlakyFS.opens = 0
    yield FlakyFS
    FlakyFS.fail_opens = FlakyFS.drop_reads = 0


def test_shard_missing_for_a_moment_is_retried(tmp_path, flaky):
    (path,) = make_shards(tmp_path, 1, 4)
    want = [(s.key, s.image) for s in iter_shard(path)]
    flaky.fail_opens = 2
    got = [(s.key, s.image) for s in iter_shard("flaky://" + path, backoff_s=0, sleep=lambda s: None)]
    assert got == want and flaky.opens == 3


def test_connection_dropped_mid_shard_resumes_without_doubling(tmp_path, flaky):
    (path,) = make_shards(tmp_path, 1, 6)
    want = [(s.key, s.index, s.image, s.error) for s in iter_shard(path)]
    flaky.drop_reads, flaky.drop_after = 2, len(open(path, "rb").read()) // 2
    got = [(s.key, s.index, s.image, s.error) for s in iter_shard("flaky://" + path, backoff_s=0,
                                                                 sleep=lambda s: None)]
    assert got == want  # every sample once, none an error row, none lost


def test_connection_that_stays_down_fails_the_shard(tmp_path, flaky):
    (path,) = make_shards(tmp_path, 1, 6)
    flaky.drop_reads, flaky.drop_after = 99, len(open(path, "rb").read()) // 2
    seen = []
    with pytest.raises(ShardUnavailable, match="ConnectionResetError"):
        for s in iter_shard("flaky://" + path, attempts=3, backoff_s=0, sleep=lambda s: None):
            seen.append(s.key)
    assert 0 < len(seen) < 6 and len(seen) == len(set(seen))


def test_truncated_tar_stays_an_error_row_not_a_retry(tmp_path, flaky):
    (path,) = make_shards(tmp_path, 1, 4)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 700])  # inside a member
    rows = list(iter_shard("flaky://" + str(cut), backoff_s=0, sleep=lambda s: None))
    assert flaky.opens == 1 and any("shard broken" in (r.error or "") for r in rows)


def test_duplicate_keys_adjacent_and_not(tmp_path):
    data = _tar_bytes(
        [("k.jpg", b"1"), ("k.txt", b"a"), ("k.jpg", b"2"), ("m.jpg", b"3"), ("k.jpg", b"4")]
    )
    path = tmp_path / "dup.tar"
    path.write_bytes(data)
    rows = list(iter_shard(str(path)))
    assert [r.key for r in rows] == ["k", "k", "m", "k"]
    assert rows[0].error is None and rows[2].error is None
    assert "duplicate key" in rows[1].error and "duplicate key" in rows[3].error


def test_unsafe_and_slashed_keys(tmp_path):
    data = _tar_bytes([("dir/ok.jpg", b"1"), ("../evil.jpg", b"2"), ("a/../b.jpg", b"3")])
    path = tmp_path / "keys.tar"
    path.write_bytes(data)
    rows = list(iter_shard(str(path)))
    assert rows[0].key == "dir/ok" and rows[0].error is None
    assert "unsafe key" in rows[1].error and "unsafe key" in rows[2].error
    assert unsafe_key_reason("/abs") and unsafe_key_reason("") and not unsafe_key_reason("a/b/c")


def test_sample_without_image(tmp_path):
    path = tmp_path / "noimg.tar"
    path.write_bytes(_tar_bytes([("a.txt", b"caption only"), ("a.json", b"{}")]))
    (row,) = list(iter_shard(str(path)))
    assert "no image member" in row.error and "txt" in row.error


def test_grouping_agrees_with_the_webdataset_library(tmp_path):
    """Our reader and webdataset's own iterators see the same samples in our shards."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    samples = [good_sample(f"dir/k{i}", seed=i) for i in range(4)] + [("plain", {"png": b"p", "txt": b"t"})]
    path = write_shard(str(tmp_path / "w.tar"), samples)
    ours = [(s.key, s.image, s.caption) for s in iter_shard(path)]
    with fsspec.open(path, "rb") as fh:
        theirs = [
            (s["__key__"], s.get("jpg", s.get("png")), s["txt"])
            for s in group_by_keys(tar_file_expander([{"url": path, "stream": fh}]))
        ]
    assert ours == theirs
