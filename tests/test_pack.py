"""`labelmill pack FOLDER OUT`: a plain folder of images becomes shards the pipeline reads, captions included."""

from __future__ import annotations

import json

from helpers import encode, one_line, photo
from labelmill.cli import main
from labelmill.io.shards import iter_shard, list_shards


def _folder(tmp_path):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    files = {"a.jpg": encode(photo(32, 24, 1)), "b.v2.png": encode(photo(40, 20, 2), "PNG"),
             "sub/c.JPG": encode(photo(24, 24, 3))}
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "a.txt").write_text("a dog on grass")
    (src / "sub" / "c.txt").write_text("two cats")
    (src / "notes.md").write_text("not an image")
    return src, files


def test_pack_writes_shards_with_captions_the_reader_reads(tmp_path, capsys):
    src, files = _folder(tmp_path)
    out = tmp_path / "shards"
    assert main(["pack", str(src), str(out), "--per-shard", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["captions"] == 2 and summary["shards"] == ["shard-00000.tar",
                                                                                          "shard-00001.tar"]
    samples = [s for url in list_shards(str(out)) for s in iter_shard(url)]
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["a", "b_v2", "sub/c"]  # sorted paths; the dot in b.v2 cannot stay in a key
    assert by_key["a"].image == files["a.jpg"] and by_key["a"].caption == b"a dog on grass"
    assert by_key["b_v2"].image == files["b.v2.png"] and by_key["b_v2"].caption is None
    assert by_key["sub/c"].image == files["sub/c.JPG"] and by_key["sub/c"].caption == b"two cats"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["key"]: s["file"] for s in manifest["samples"]} == {"a": "a.jpg", "b_v2": "b.v2.png",
                                                                   "sub/c": "sub/c.JPG"}


def test_pack_refuses_with_one_line(tmp_path, capsys):
    src, _ = _folder(tmp_path)
    (src / "a.png").write_bytes(encode(photo(8, 8, 0), "PNG"))  # a.jpg and a.png: the same key
    assert main(["pack", str(src), str(tmp_path / "o")]) == 4
    assert "would both be sample 'a'" in one_line(capsys, "labelmill: input error:")
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "o")]) == 4
    assert "is not a folder" in one_line(capsys, "labelmill: input error:")
    (tmp_path / "empty").mkdir()
    assert main(["pack", str(tmp_path / "empty"), str(tmp_path / "o")]) == 4
    assert "no images under" in one_line(capsys, "labelmill: input error:")
    (src / "a.png").unlink()
    assert main(["pack", str(src), str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["pack", str(src), str(tmp_path / "o")]) == 4  # OUT already holds shards
    assert "already holds shards" in one_line(capsys, "labelmill: input error:")
