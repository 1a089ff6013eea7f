"""Nested settings dicts compared key by key."""

from __future__ import annotations

from typing import Any

_UNSET = object()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}`` (lists indexed by position)."""
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict | list) and v:
            out |= flatten(v, key)
        else:
            out[key] = v
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs (missing keys shown as ``<unset>``)."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(a.keys() | b.keys()):
        va, vb = a.get(k, _UNSET), b.get(k, _UNSET)
        if va != vb:
            show = ["<unset>" if v is _UNSET else repr(v) for v in (va, vb)]
            out.append(f"{k}: {show[0]} -> {show[1]}")
    return out
