"""Scenario text for the objective tests of each tool's adapter, the skip mark for a missing environment, and the
message of a scenario validation refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.running import envs
from harness.spec.scenario import ScenarioError, parse_scenario

LORA = "{kind: lora, lora_r: 8, lora_alpha: 16}"
SYNTHETIC = "{source: synthetic, seq_len: 48, lengths: fixed}"
TRAIN = "{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3}"
TINY = "{preset: tiny-llama, weights: random, dtype: float32}"
# GRPO's data: the arithmetic task's prompts with a verifiable answer
PROMPTS = Path(__file__).resolve().parents[1] / "scenarios" / "tasks" / "tb_prompts_add.jsonl"
PROMPTS_DATA = f"{{source: jsonl, path: {PROMPTS}, seq_len: 96}}"


def refusal(text: str) -> str:
    """The message validation gives a scenario ``text`` it must refuse."""
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(text, "t.yaml")
    return str(ei.value)


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
