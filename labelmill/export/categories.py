"""Category ids for COCO-style exports: the ids users already have.

* ``--category-ids FILE`` (a JSON map ``{name: id}``, ``{name: {"id": .., "supercategory": ..}}``,
  or any COCO file with a ``categories`` list, e.g. the user's own
  ``instances_val2017.json``) gives the ids; every exported class must be in it.
* Otherwise, classes that are all COCO-80 names get the official COCO ids
  (1..90 with gaps) and supercategories.
* Otherwise a class's id is its vocabulary index + 1 (stable across versions,
  whichever classes happen to have labels), supercategory ``pseudo``.
"""

from __future__ import annotations

import json
from typing import Any

from labelmill.export.base import ExportOptionError

#: (id, name, supercategory) of the 80 COCO 2017 detection categories
COCO_80 = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)

COCO_80_BY_NAME = {name: {"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_80}


def load_category_ids(path: str) -> dict[str, dict[str, Any]]:
    """Read a user's id map (see the module doc) into ``{name: {"id", "name", "supercategory"}}``."""
    import fsspec

    try:
        with fsspec.open(path, "r") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise ExportOptionError(f"--category-ids file {path} does not exist") from None
    except ValueError as exc:
        raise ExportOptionError(f"--category-ids file {path} is not JSON: {exc}") from None
    out: dict[str, dict[str, Any]] = {}
    try:
        if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
            for c in doc["categories"]:
                out[str(c["name"])] = {"id": int(c["id"]), "name": str(c["name"]),
                                       "supercategory": str(c.get("supercategory") or "none")}
        elif isinstance(doc, dict):
            for name, value in doc.items():
                if isinstance(value, dict):
                    out[name] = {"id": int(value["id"]), "name": name,
                                 "supercategory": str(value.get("supercategory") or "none")}
                else:
                    out[name] = {"id": int(value), "name": name, "supercategory": "none"}
        else:
            raise TypeError("not an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportOptionError(f"--category-ids file {path}: expected {{name: id}}, {{name: {{id, supercategory}}}} "
                                f"or a COCO file with 'categories' ({type(exc).__name__}: {exc})") from None
    ids = [c["id"] for c in out.values()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ExportOptionError(f"--category-ids file {path} gives ids {dupes} to more than one class")
    return out


def categories_for(classes: dict[str, int], names: list[str],
                   id_map: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """COCO ``categories`` for the class ``names`` (``classes``: name -> vocabulary class id)."""
    if id_map is not None:
        missing = [n for n in names if n not in id_map]
        if missing:
            raise ExportOptionError(f"--category-ids has no id for class(es) {missing}; add them, or leave them "
                                    "out with --classes")
        return sorted((dict(id_map[n]) for n in names), key=lambda c: c["id"])
    if names and all(n in COCO_80_BY_NAME for n in names):
        return sorted((dict(COCO_80_BY_NAME[n]) for n in names), key=lambda c: c["id"])
    ids = {n: classes[n] + 1 for n in names}
    if len(set(ids.values())) < len(ids):  # class ids shared by several names: number them instead
        ids = {n: i + 1 for i, n in enumerate(names)}
    return sorted(({"id": ids[n], "name": n, "supercategory": "pseudo"} for n in names), key=lambda c: c["id"])
