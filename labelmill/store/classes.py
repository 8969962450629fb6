"""Class ids that never move: one registry per output, grown by commits, never shrunk.

Every version record may carry ``classes_added``: the classes its commit
registered for the first time, each ``{"name", "id", "index",
"supercategory"}``.  The registry of an output is the union of these over all
its records, so a class keeps its ids in every version (rollbacks included)
and in every export of any version:

* ``index`` (YOLO's class number, 0..N-1): the order in which the output
  first saw the class.  The first run's vocabulary order gives index = the
  vocabulary's class id.
* ``id`` (COCO ``category_id``): the official id for a COCO name: the 80
  detection classes keep 1..90 (with COCO's gaps), COCO-Stuff's 91 stuff
  classes 92..182; every other name gets the next free id from 1001 up, in
  order of first appearance (so it never reads as a COCO class).

A run registers its teachers' vocabularies (``info["vocabularies"]``) when it
commits; exports add, for their own use only, a class that a label names but
that no record registered (outputs written before the registry existed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable

#: first id given to a class that is neither a COCO thing nor a COCO-Stuff stuff class
FIRST_OWN_ID = 1001

#: (id, name, supercategory) of the 80 COCO 2017 detection categories
COCO_80 = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)

COCO_80_BY_NAME = {name: {"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_80}

_STANDARD: dict[str, tuple[int, str]] | None = None


def standard_ids() -> dict[str, tuple[int, str]]:
    """name -> (official id, supercategory): COCO's 80 things, then COCO-Stuff's 91 stuff classes (92..182).

    The stuff names are those of labelmill's ``coco-stuff-171`` vocabulary
    (lines 81..171, in COCO-Stuff's id order), so a run with that vocabulary
    exports COCO-Stuff's own ids.
    """
    global _STANDARD
    if _STANDARD is None:
        out = {name: (cid, sup) for cid, name, sup in COCO_80}
        text = resources.files("labelmill.teachers").joinpath("vocabularies/coco-stuff-171.txt").read_text()
        names = [ln.split(",")[0].strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        for i, name in enumerate(names[80:]):
            out.setdefault(name, (92 + i, "stuff"))
        _STANDARD = out
    return _STANDARD


@dataclass
class ClassRegistry:
    """name -> ``{"name", "id", "index", "supercategory"}`` in index order."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "ClassRegistry":
        reg = cls()
        for rec in records:
            for e in rec.get("classes_added") or []:
                reg.entries.setdefault(e["name"], dict(e))
        return reg

    def extend(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Register the names not yet known (in the order given); returns the new entries."""
        std = standard_ids()
        used = {e["id"] for e in self.entries.values()}
        own = max([i for i in used if i >= FIRST_OWN_ID], default=FIRST_OWN_ID - 1) + 1
        added = []
        for name in names:
            if name in self.entries:
                continue
            if name in std and std[name][0] not in used:
                cid, sup = std[name]
            else:
                cid, sup = own, "pseudo"
                own += 1
            entry = {"name": name, "id": cid, "index": len(self.entries), "supercategory": sup}
            self.entries[name] = entry
            used.add(cid)
            added.append(entry)
        return added

    def names(self) -> list[str]:
        """Class names by index (YOLO's ``names``)."""
        return sorted(self.entries, key=lambda n: self.entries[n]["index"])

    def index(self, name: str) -> int:
        return self.entries[name]["index"]

    def category(self, name: str) -> dict[str, Any]:
        e = self.entries[name]
        return {"id": e["id"], "name": name, "supercategory": e["supercategory"]}

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)


def vocabularies_added(registry: ClassRegistry, vocabularies: dict[str, list[str]] | None) -> list[dict[str, Any]]:
    """The entries a commit adds for its teachers' vocabularies (teachers in the order given)."""
    names: list[str] = []
    for vocab in (vocabularies or {}).values():
        names += [n for n in vocab or [] if n not in names]
    return registry.extend(names)
