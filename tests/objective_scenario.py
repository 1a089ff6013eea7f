"""Scenario text for the objective tests of each tool's adapter, and the skip mark for a missing environment."""

from __future__ import annotations

import pytest

from harness.running import envs

LORA = "{kind: lora, lora_r: 8, lora_alpha: 16}"
SYNTHETIC = "{source: synthetic, seq_len: 48, lengths: fixed}"
TRAIN = "{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3}"
TINY = "{preset: tiny-llama, weights: random, dtype: float32}"


def needs_env(name: str) -> pytest.MarkDecorator:
    """Skip unless the toolkit environment ``name`` has been created."""
    return pytest.mark.skipif(not envs.resolve(name).ready,
                              reason=f"{name} environment not created: run `python -m harness env create {name}`")


def objective_yaml(name: str, objective: str, frameworks: str, device: str, method: str = LORA,
                   data: str = SYNTHETIC, train: str = TRAIN, model: str = TINY, baseline: str | None = None) -> str:
    """A small scenario training ``objective`` (YAML flow text, e.g. ``{kind: dpo, beta: 0.2}``) with ``frameworks``
    (``[trl]``) on ``device``."""
    measure = f"{{baseline: {baseline}, timeout_s: 900}}" if baseline else "{timeout_s: 900}"
    return (f"version: 1\nname: {name}\nmodel: {model}\nmethod: {method}\nobjective: {objective}\ndata: {data}\n"
            f"train: {train}\nhardware: {{device: {device}}}\nframeworks: {frameworks}\nmeasure: {measure}\n")
