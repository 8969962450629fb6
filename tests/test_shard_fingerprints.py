"""Fingerprinted shard listing: same shards as list_shards, one listing per prefix, no per-shard stat."""

from __future__ import annotations

import os

import fsspec
import pytest

from helpers import make_shards
from labelmill.io.shards import Fingerprint, ShardListError, list_shard_fingerprints, list_shards, write_shard
from s3server import s3_endpoint  # noqa: F401  (fixture)


def _forms(root: str) -> list[str]:
    return [root, f"{root}/*.tar", f"{root}/shard-{{00000..00003}}.tar", f"{root}/shard-0000[13].tar"]


def test_same_shards_and_order_as_list_shards(tmp_path):
    paths = make_shards(tmp_path / "d", 4, 1)
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    for spec in _forms(str(tmp_path / "d")) + [[paths[3], paths[0], paths[3]]]:
        listed = list_shard_fingerprints(spec)
        assert list(listed) == list_shards(spec), spec
        for url, fp in listed.items():
            assert fp.size == os.path.getsize(url) and fp.mtime is not None and fp.sha256 is None


def test_missing_names_of_a_brace_pattern_are_skipped_and_nothing_is_an_error(tmp_path):
    paths = make_shards(tmp_path / "d", 2, 1)
    assert list(list_shard_fingerprints(str(tmp_path / "d" / "shard-{00000..00009}.tar"))) == paths
    with pytest.raises(ShardListError, match="matches no shard"):
        list_shard_fingerprints(str(tmp_path / "nowhere" / "shard-{0..3}.tar"))
    with pytest.raises(ShardListError, match="matches no shard"):
        list_shard_fingerprints(str(tmp_path / "d" / "*.tgz"))


def test_a_rewrite_changes_the_fingerprint(tmp_path):
    from helpers import good_sample

    paths = make_shards(tmp_path / "d", 2, 2)
    before = list_shard_fingerprints(str(tmp_path / "d"))
    again = list_shard_fingerprints(str(tmp_path / "d"))
    assert all(before[u].same_content(again[u]) for u in paths)
    # same size, new bytes, new mtime
    write_shard(paths[0], [good_sample("0000000", seed=99), good_sample("0000001", seed=98)])
    os.utime(paths[0], ns=(os.stat(paths[1]).st_mtime_ns + 5_000_000_000,) * 2)
    after = list_shard_fingerprints(str(tmp_path / "d"))
    assert not before[paths[0]].same_content(after[paths[0]])
    assert before[paths[1]].same_content(after[paths[1]])


def test_content_hash_catches_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    path = str(tmp_path / "d" / "shard-00000.tar")
    os.makedirs(tmp_path / "d")
    with open(path, "wb") as fh:
        fh.write(b"a" * 1024)
    stamp = os.stat(path).st_mtime_ns
    first = list_shard_fingerprints(str(tmp_path / "d"), content_hash=True)[path]
    with open(path, "wb") as fh:
        fh.write(b"b" * 1024)
    os.utime(path, ns=(stamp, stamp))
    plain = list_shard_fingerprints(str(tmp_path / "d"))[path]
    hashed = list_shard_fingerprints(str(tmp_path / "d"), content_hash=True)[path]
    assert first.same_content(plain)  # size and mtime cannot see it
    assert not first.same_content(hashed) and hashed.sha256 != first.sha256 and len(hashed.sha256) == 64


def test_fingerprint_comparison_rules():
    a = Fingerprint(10, etag="e1", mtime="1.0")
    assert a.same_content(Fingerprint(10, etag="e1", mtime="2.0"))  # etag wins over mtime
    assert not a.same_content(Fingerprint(10, etag="e2", mtime="1.0"))
    assert not a.same_content(Fingerprint(11, etag="e1", mtime="1.0"))
    assert Fingerprint(10, mtime="1.0", sha256="h").same_content(Fingerprint(10, mtime="9.0", sha256="h"))
    assert not Fingerprint(10).same_content(Fingerprint(10))  # nothing to compare: treated as changed
    assert Fingerprint.from_dict(a.to_dict()) == a and "sha256" not in a.to_dict()


def test_local_listing_never_stats_a_shard_on_its_own(tmp_path, monkeypatch):
    make_shards(tmp_path / "d", 12, 1)
    local = type(fsspec.filesystem("file"))
    calls: dict[str, int] = {}
    for name in ("info", "exists", "isdir", "isfile", "ls", "find", "glob"):
        original = getattr(local, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(local, name, counted)
    listed = list_shard_fingerprints(str(tmp_path / "d" / "shard-{00000..00011}.tar"))
    assert len(listed) == 12
    # one directory listing; the stats inside it are how a local `ls -l` works (one per entry),
    # nothing is asked about a shard outside that listing
    assert calls.get("ls") == 1 and calls.get("info", 0) <= 13
    assert not calls.get("exists") and not calls.get("isdir") and not calls.get("isfile") and not calls.get("find")


def test_s3_prefix_glob_and_brace_one_listing_each(s3_endpoint, monkeypatch):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**opts)
    for s in range(30):
        fs.pipe(f"data/shards/part-{s:05d}.tar", b"x" * (100 + s))
    fs.pipe("data/shards/readme.txt", b"no shard")
    fs.pipe("data/shards/sub/part-99999.tar", b"nested")

    ops: list[str] = []
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        ops.append(method)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    for spec, expected in [
        ("s3://data/shards", 31),
        ("s3://data/shards/*.tar", 30),
        ("s3://data/shards/part-{00000..00029}.tar", 30),
    ]:
        ops.clear()
        listed = list_shard_fingerprints(spec, opts)
        assert len(listed) == expected, spec
        assert all(url.startswith("s3://data/shards/") for url in listed)
        assert "head_object" not in ops, (spec, ops)
        assert ops.count("list_objects_v2") <= 2, (spec, ops)  # one listing (a glob may list its root once)
        assert list(listed) == list_shards(spec, opts)
    fp = list_shard_fingerprints("s3://data/shards/part-{00000..00029}.tar", opts)
    assert fp["s3://data/shards/part-00007.tar"].size == 107 and fp["s3://data/shards/part-00007.tar"].etag
    # rewritten: a new etag, seen in the same process (caches are dropped)
    fs.pipe("data/shards/part-00007.tar", b"y" * 107)
    again = list_shard_fingerprints("s3://data/shards", opts)
    assert not fp["s3://data/shards/part-00007.tar"].same_content(again["s3://data/shards/part-00007.tar"])
    assert fp["s3://data/shards/part-00008.tar"].same_content(again["s3://data/shards/part-00008.tar"])
    hashed = list_shard_fingerprints("s3://data/shards/*.tar", opts, content_hash=True)
    assert all(len(f.sha256) == 64 for f in hashed.values())
