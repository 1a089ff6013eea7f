"""Older stored results read as the current schema: one step per version, applied in order.

Stored runs are never rewritten (results are append-only); a file keeps the version it was written with and is
migrated each time it is read. Version 1 (``schema_version: 1``) differs from version 2 in what it may leave
out, not in names or units:

- ``adapter`` is absent in results stored before framework rows had labels; the framework then *was* the
  adapter's name (their scenarios list ``- name: hf`` without a ``label``);
- ``metrics`` may be ``null`` or absent (a run that timed out before its worker wrote anything, a crash);
- ``settings_hash``, ``eval``, ``environment.variables`` and the bookkeeping keys may be absent: the schema
  fills them with ``null`` (not recorded) or an empty container.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness.storing.schema import RESULT_SCHEMA_VERSION


class ResultSchemaError(ValueError):
    """A stored result that no known schema version describes."""


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if not out.get("adapter"):
        out["adapter"] = out.get("framework")  # before labels the framework key was the adapter's name
    if out.get("metrics") is None:
        out["metrics"] = {}
    out["schema_version"] = 2
    return out


# MIGRATIONS[v] turns a version-v dict into a version-(v + 1) dict
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A stored result dict of any known version as a current-version dict (not yet validated).

    Args:
        data: the JSON object as stored; ``schema_version`` absent counts as 1 (the first stored results).

    Returns:
        A new dict in the current schema (:data:`harness.storing.schema.RESULT_SCHEMA_VERSION`).

    Raises:
        ResultSchemaError: the version is not an integer, or newer than this harness knows.
    """
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ResultSchemaError(f"schema_version {version!r} is not a version number")
    if version > RESULT_SCHEMA_VERSION:
        raise ResultSchemaError(f"schema_version {version} is newer than this harness reads "
                                f"({RESULT_SCHEMA_VERSION}): update the checkout")
    out = dict(data)
    for v in range(version, RESULT_SCHEMA_VERSION):
        out = MIGRATIONS[v](out)
    return out
