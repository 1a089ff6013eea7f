"""The adapter contract.

Each adapter is a package ``adapters_for_tools/<name>/`` with:

- ``__init__.py``: light, importable everywhere (no torch, no toolkit import). It defines ``INFO``, an
  :class:`AdapterInfo` saying what the adapter supports, which environment its worker runs in, and why it
  is unavailable on this machine (missing package, needs CUDA, environment not created).
- ``adapter.py``: heavy, imported only inside the worker process. It defines ``run(ctx) -> None`` that
  turns ``ctx.scenario`` into the tool's own configuration (saved under ``ctx.work_dir``), loads
  ``ctx.checkpoint``, trains on ``ctx.dataset_path``, drives ``ctx.meter`` at every optimizer step, calls
  ``ctx.set_effective(...)`` with the settings read back from the live model/trainer, and saves the trained
  output (PEFT adapter or HF checkpoint) in ``ctx.output_dir``.

Keep adapters independent: a little duplication beats a deep class hierarchy.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

# scenario train.optimizer -> transformers TrainingArguments.optim (hf, TRL, Axolotl and LLaMA-Factory all take it)
HF_OPTIM = {"adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
            "sgd": "sgd"}


def trainer_args(sc) -> dict[str, Any]:  # noqa: ANN001
    """The transformers ``TrainingArguments`` that carry the scenario's optimisation settings, under their own
    names: shared by every HF-Trainer-based tool that takes them as such (hf, TRL, Unsloth, LLaMA-Factory).
    No LR warmup (the scenario has none); ``max_grad_norm`` 0 = no clipping."""
    t = sc.train
    return {
        "per_device_train_batch_size": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "max_steps": t.steps,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": 0,
        "optim": HF_OPTIM[t.optimizer],
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm or 0.0,
    }
ALL_METHODS = frozenset({"full", "lora", "qlora", "dora"})
ALL_FAMILIES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    description: str
    env: str = "base"  # environment the worker runs in (harness.running.envs); "base" = this interpreter
    methods: frozenset[str] = ALL_METHODS
    families: frozenset[str] = ALL_FAMILIES
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    requires: tuple[str, ...] = ()  # import names that must be importable in the adapter's environment
    version_of: str | None = None  # distribution whose version is the tool's version
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cannot_run(self, sc) -> str | None:
        """Why this adapter can never run the scenario (checked at validation), or None."""
        if sc.method.kind not in self.methods:
            return f"method {sc.method.kind!r} not supported (supports {sorted(self.methods)})"
        if sc.hardware.device not in self.devices:
            return f"device {sc.hardware.device!r} not supported (supports {sorted(self.devices)})"
        family = _family_of(sc)
        if family and family not in self.families:
            return f"model family {family!r} not supported (supports {sorted(self.families)})"
        return None

    def unavailable(self, device: str | None = None) -> str | None:
        """Why the adapter cannot run on this machine now (recorded as an 'unavailable' row), or None."""
        from harness.running import envs

        env = envs.resolve(self.env)
        if not env.ready:
            return env.reason
        if device == "cuda" and not envs.has_cuda():
            return "needs CUDA: no NVIDIA GPU visible on this machine"
        if self.env == "base":
            missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
            if missing:
                return (f"python packages missing: {', '.join(missing)} "
                        f"(pip install them, or `python -m harness env create {self.name}`)")
        return None


def _family_of(sc) -> str | None:
    if sc.model.preset:
        from harness.inputs.models import get_preset

        try:
            return get_preset(sc.model.preset).family
        except KeyError:
            return None
    return None


def rerun_command(module_args: str) -> str:
    """The shell command that reruns ``python -m <module_args>`` with the tool alone, in this worker's
    interpreter and package overlay (its ``PYTHONPATH``): what adapters store as ``extra["rerun"]``."""
    return f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} {sys.executable} -m {module_args}"
