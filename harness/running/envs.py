"""Per-framework environments: which interpreter and package overlay a framework's worker runs with.

Toolkits pin conflicting versions, so each one gets its own environment: an overlay directory of packages
installed with ``pip --target`` that is put first on ``PYTHONPATH`` over the base interpreter (which keeps
its torch). The base environment ("base") is this interpreter as it is.

Layout: ``.envs/<name>/site/`` (packages) and ``.envs/<name>/env.json`` (what was installed, when).
``TUNEBENCH_ENVS`` moves the root. ``python -m harness env ...`` creates, packs and checks them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from adapters_for_tools.contract import AdapterInfo
from harness.common.paths import REPO_ROOT
from harness.storing.results import read_json


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


def site_dir(name: str) -> Path:
    """The overlay directory of environment ``name`` (packages installed with ``pip --target``)."""
    return envs_root() / name / "site"


def read_meta(name: str) -> dict | None:
    """``env.json`` of an installed environment, or None."""
    return read_json(envs_root() / name / "env.json")


def resolve(name: str) -> EnvSpec:
    """The environment a worker runs in; ``ready=False`` with a reason when it is not created yet.

    The optional ``base`` overlay (``.envs/base``: bitsandbytes, pydantic where the interpreter lacks them) is
    put on the path of every environment, after the environment's own overlay so that the tool's pins win.
    """
    base_meta = read_meta("base")
    base_path = [str(site_dir("base"))] if base_meta is not None else []
    base_vars = (base_meta or {}).get("env_vars", {})
    if name == "base":
        return EnvSpec(name="base", pythonpath=base_path, env_vars=dict(base_vars))
    info = read_meta(name)
    if info is None:
        return EnvSpec(name=name, ready=False,
                       reason=f"environment {name!r} not created: run `python -m harness env create {name}` "
                              f"(or install its offline bundle: `python -m harness env install BUNDLE`)")
    python = info.get("python") or sys.executable
    if not Path(python).exists():
        python = sys.executable  # installed from a bundle built elsewhere: this interpreter runs it
    built_for = info.get("python_version")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python == sys.executable and built_for and built_for != here:
        return EnvSpec(name=name, ready=False,
                       reason=f"environment {name!r} was built for Python {built_for}, this is Python {here}: "
                              f"recreate it (`python -m harness env create {name}`)")
    return EnvSpec(name=name, python=python, pythonpath=[str(site_dir(name))] + base_path,
                   env_vars=base_vars | info.get("env_vars", {}))


def has_cuda() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the runner stays light)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import pynvml  # optional (nvidia-ml-py): absent on machines without NVIDIA drivers

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def unavailable(info: AdapterInfo, device: str | None = None) -> str | None:
    """Why adapter ``info`` cannot run on this machine now (recorded as an 'unavailable' row), or None.

    Args:
        info: the adapter's declaration.
        device: the scenario's device; ``"cuda"`` also needs a visible NVIDIA GPU.

    Returns:
        The reason (environment not created, no GPU, packages missing from this interpreter), or None.
    """
    env = resolve(info.env)
    if not env.ready:
        return env.reason
    if device == "cuda" and not has_cuda():
        return "needs CUDA: no NVIDIA GPU visible on this machine"
    if info.env == "base":  # a tool environment is another sys.path: its packages cannot be looked up from here
        missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
        if missing:
            return (f"python packages missing: {', '.join(missing)} "
                    f"(pip install them, or `python -m harness env create {info.name}`)")
    return None


def worker_environment(env: EnvSpec) -> dict[str, str]:
    """The worker's environment variables: ours, the overlay first on PYTHONPATH, offline hubs, no telemetry.

    TRITON_INTERPRET is not passed on: the kernel tests set it for their own process, and a tunebench worker
    that inherited it would run every op in Triton's CPU interpreter (~100x slower than the PyTorch fallback).
    Set TUNEBENCH_TRITON_INTERPRET=1 to run workers under the interpreter on purpose.
    """
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    if e.get("TUNEBENCH_TRITON_INTERPRET") == "1":
        e["TRITON_INTERPRET"] = "1"
    # the overlay first (its pins win), then the repository (harness, adapters, kernels)
    paths = env.pythonpath + [str(REPO_ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])
    e.update({"PYTHONPATH": os.pathsep.join(paths), "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled",
              "WANDB_DISABLED": "true", "DO_NOT_TRACK": "1"})
    e.update(env.env_vars)
    return e
