"""Adapter registry: every package under adapters_for_tools/ that defines ``INFO`` is an adapter.

Light: importing the registry imports only the adapters' ``__init__`` modules, never their toolkits.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from adapters_for_tools.contract import AdapterInfo
from harness.common.names import unknown

_PKG_DIR = Path(__file__).resolve().parent


@cache
def _infos() -> dict[str, AdapterInfo]:
    out: dict[str, AdapterInfo] = {}
    for mod in sorted(pkgutil.iter_modules([str(_PKG_DIR)]), key=lambda m: m.name):
        if not mod.ispkg:
            continue
        pkg = importlib.import_module(f"adapters_for_tools.{mod.name}")
        info = getattr(pkg, "INFO", None)
        if isinstance(info, AdapterInfo):
            out[info.name] = info
    return out


def names() -> list[str]:
    return list(_infos())


def info(name: str) -> AdapterInfo:
    infos = _infos()
    if name not in infos:
        raise KeyError(unknown("framework", name, infos))
    return infos[name]


def load_adapter(name: str):
    """Import the heavy adapter module (worker side only)."""
    info(name)
    return importlib.import_module(f"adapters_for_tools.{name}.adapter")
