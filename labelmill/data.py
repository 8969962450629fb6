"""``labelmill.data``: the read API of an output folder (a consistent, pinned dataset version).

::

    import labelmill.data
    ds = labelmill.data.open("s3://bucket/labels/cc3m", version=None)   # latest; or 12; or "2026-11-30T20:00"
    ds.read("labels", columns=["key", "class_name", "score"])
    ds.to_ray("regions")
    labelmill.data.versions("s3://bucket/labels/cc3m")

The implementation lives in :mod:`labelmill.store.read`.
"""

from __future__ import annotations

from labelmill.store.read import DatasetVersion, OutputNotFound, VersionNotFound, list_versions, open_version

__all__ = ["DatasetVersion", "OutputNotFound", "VersionNotFound", "open", "versions"]


def open(output: str, version: int | str | None = None, *, storage_options: dict | None = None) -> DatasetVersion:  # noqa: A001
    """A pinned view of every table of ``version`` (None: the latest; an int; an ISO timestamp)."""
    return open_version(output, version, storage_options=storage_options)


def versions(output: str, storage_options: dict | None = None) -> list[dict]:
    """All version records, oldest first."""
    return list_versions(output, storage_options)
