"""Per-framework environments: which interpreter and package overlay a framework's worker runs with.

Toolkits pin conflicting versions, so each one gets its own environment: an overlay directory of packages
installed with ``pip --target`` that is put first on ``PYTHONPATH`` over the base interpreter (which keeps
its torch). The base environment ("base") is this interpreter as it is.

Layout: ``.envs/<name>/site/`` (packages) and ``.envs/<name>/env.json`` (what was installed, when).
``TUNEBENCH_ENVS`` moves the root. ``python -m harness env ...`` creates, packs and checks them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def envs_root() -> Path:
    return Path(os.environ.get("TUNEBENCH_ENVS", REPO_ROOT / ".envs"))


@dataclass
class EnvSpec:
    name: str
    python: str = sys.executable
    pythonpath: list[str] = field(default_factory=list)  # prepended, in order
    ready: bool = True
    reason: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)


def resolve(name: str) -> EnvSpec:
    """The environment a worker runs in; ``ready=False`` with a reason when it is not created yet."""
    if name == "base":
        return EnvSpec(name="base")
    root = envs_root() / name
    meta = root / "env.json"
    if not meta.exists():
        return EnvSpec(name=name, ready=False,
                       reason=f"environment {name!r} not created: run `python -m harness env create {name}` "
                              f"(or install its offline bundle: `python -m harness env install BUNDLE`)")
    info = json.loads(meta.read_text())
    return EnvSpec(name=name, python=info.get("python") or sys.executable, pythonpath=[str(root / "site")],
                   env_vars=info.get("env_vars", {}))


def has_cuda() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the runner stays light)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False
