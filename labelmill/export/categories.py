"""Category ids for COCO-style exports: the ids users already have, the same in every version.

* ``--category-ids FILE`` (a JSON map ``{name: id}``, ``{name: {"id": .., "supercategory": ..}}``,
  or any COCO file with a ``categories`` list, e.g. the user's own
  ``instances_val2017.json``) gives the ids; every exported class must be in it.
* Otherwise the output's class registry (:mod:`labelmill.store.classes`)
  does: official COCO ids for COCO's 80 classes, COCO-Stuff's for its stuff
  classes, 1001.. for the others, fixed when the output first saw the class.
"""

from __future__ import annotations

import json
from typing import Any

from labelmill.export.base import ExportOptionError
from labelmill.store import classes
from labelmill.store.classes import ClassRegistry

COCO_80 = classes.COCO_80
COCO_80_BY_NAME = classes.COCO_80_BY_NAME


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


def categories_for(registry: ClassRegistry, names: list[str],
                   id_map: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """COCO ``categories`` for the class ``names``: from ``id_map`` when given, else from the registry."""
    if id_map is not None:
        missing = [n for n in names if n not in id_map]
        if missing:
            raise ExportOptionError(f"--category-ids has no id for class(es) {missing}; add them, or leave them "
                                    "out with --classes")
        return sorted((dict(id_map[n]) for n in names), key=lambda c: c["id"])
    return sorted((registry.category(n) for n in names), key=lambda c: c["id"])
