"""Export building blocks without a pipeline: mask -> polygon exactness, category id maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.draw import polygon2mask

from labelmill.export.base import ExportOptionError
from labelmill.export.categories import COCO_80, categories_for, load_category_ids
from labelmill.store.classes import ClassRegistry
from labelmill.export.polygons import mask_polygon


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def _parts_filled(m: np.ndarray) -> np.ndarray:
    parts, n = ndimage.label(m)
    out = np.zeros_like(m)
    for i in range(1, n + 1):
        out |= ndimage.binary_fill_holes(parts == i)
    return out


@pytest.mark.parametrize("kind", ["blocks", "noise"])
def test_polygon_reproduces_the_mask_at_pixel_centres(kind):
    """Rectangles in several parts, and salt noise full of corner contacts: the polygon is exact."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        if kind == "noise":
            m = rng.random((9, 11)) > 0.6
        else:
            m = np.zeros((30, 40), bool)
            for _ in range(rng.integers(1, 5)):
                y, x = rng.integers(0, 25), rng.integers(0, 35)
                m[y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = True
        if not m.any():
            continue
        poly = mask_polygon(_rle(m))
        assert np.array_equal(poly, np.round(poly))  # vertices are pixel corners
        drawn = polygon2mask(m.shape, np.stack([poly[:, 1] - 0.5, poly[:, 0] - 0.5], 1))
        assert np.array_equal(drawn, _parts_filled(m))


def test_coco_80_table_and_id_maps(tmp_path):
    assert len(COCO_80) == 80 and COCO_80[0] == (1, "person", "person") and COCO_80[-1][0] == 90
    reg = ClassRegistry()
    reg.extend(["dog", "cat"])
    assert categories_for(reg, ["dog", "cat"]) == [
        {"id": 17, "name": "cat", "supercategory": "animal"}, {"id": 18, "name": "dog", "supercategory": "animal"}]
    # COCO-Stuff's stuff classes keep their ids; other names get 1001.., never a COCO id
    reg.extend(["grass", "gizmo", "wood", "widget"])
    assert [c["id"] for c in categories_for(reg, ["cat", "grass", "gizmo", "wood", "widget"])] == [
        17, 124, 182, 1001, 1002]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"grass": 5, "cat": {"id": 9, "supercategory": "pet"}}))
    ids = load_category_ids(str(plain))
    assert categories_for(reg, ["cat", "grass"], ids) == [
        {"id": 5, "name": "grass", "supercategory": "none"}, {"id": 9, "name": "cat", "supercategory": "pet"}]
    with pytest.raises(ExportOptionError, match=r"no id for class\(es\) \['sky'\]"):
        categories_for(reg, ["sky"], ids)
    dupes = tmp_path / "dupes.json"
    dupes.write_text(json.dumps({"a": 1, "b": 1}))
    with pytest.raises(ExportOptionError, match="more than one class"):
        load_category_ids(str(dupes))
    with pytest.raises(ExportOptionError, match="does not exist"):
        load_category_ids(str(tmp_path / "missing.json"))


def test_class_registry_grows_and_never_moves_an_id():
    from labelmill.store.classes import FIRST_OWN_ID, standard_ids, vocabularies_added

    std = standard_ids()
    assert std["sky"] == (157, "stuff") and std["wood"] == (182, "stuff") and std["banner"] == (92, "stuff")
    assert len({cid for cid, _ in std.values()}) == 171  # 80 things + 91 stuff, no id twice
    records = [{"classes_added": vocabularies_added(ClassRegistry(), {"t": ["pizza", "gizmo", "teddy bear"]})}]
    assert [(e["name"], e["id"], e["index"]) for e in records[0]["classes_added"]] == [
        ("pizza", 59, 0), ("gizmo", FIRST_OWN_ID, 1), ("teddy bear", 88, 2)]
    # a later vocabulary in another order, with new names: old entries untouched, new ones appended
    later = vocabularies_added(ClassRegistry.from_records(records), {"t": ["widget", "teddy bear", "pizza", "sky"],
                                                                     "u": ["gizmo", "car"]})
    assert [(e["name"], e["id"], e["index"]) for e in later] == [
        ("widget", FIRST_OWN_ID + 1, 3), ("sky", 157, 4), ("car", 3, 5)]
    reg = ClassRegistry.from_records(records + [{"classes_added": later}, {"kind": "rollback"}])
    assert reg.names() == ["pizza", "gizmo", "teddy bear", "widget", "sky", "car"]
    assert vocabularies_added(reg, {"t": ["pizza", "car"]}) == []  # nothing new: the record gets no entry


def test_export_modules_import_one_way():
    """coco.py holds the COCO file writers; mdetr.py builds on it, never the other way round."""
    import ast
    from pathlib import Path

    import labelmill.export.coco as coco

    tree = ast.parse(Path(coco.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "labelmill.export.mdetr" not in imported
