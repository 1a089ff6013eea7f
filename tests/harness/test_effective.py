"""Effective settings: read back from the live model; a mismatch marks the run invalid."""

from __future__ import annotations

import pytest

from harness.measuring import effective
from harness.spec.scenario import parse_scenario

YAML = """\
version: 1
name: t
model: {preset: tiny-llama, dtype: float32}
method: {kind: lora, lora_r: 4, lora_alpha: 8}
data: {seq_len: 32}
train: {micro_batch: 2, steps: 3, warmup_steps: 1, gradient_checkpointing: true}
hardware: {device: cpu}
frameworks: [hf]
"""


@pytest.fixture()
def lora_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.inputs.models import get_preset, prepare_random_checkpoint

    d = prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
    m = AutoModelForCausalLM.from_pretrained(d)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def test_live_model_matches_scenario(lora_model):
    sc = parse_scenario(YAML, "t.yaml")
    lora_model.train()
    eff = effective.read_back_model(lora_model) | {"micro_batch": 2, "grad_accum": 1, "optimizer": "adamw_torch_fused",
                                                   "lr": 2e-4, "seq_len": 32}
    assert eff["lora_r"] == 4 and eff["trainable_params"] > 0 and eff["target_modules"][0] == "down_proj"
    assert effective.check(sc, eff) == []


def test_eval_mode_trap_is_caught(lora_model):
    """from_pretrained returns eval mode; checkpointing then silently does nothing: the run is invalid."""
    sc = parse_scenario(YAML, "t.yaml")
    lora_model.eval()
    problems = effective.check(sc, effective.read_back_model(lora_model))
    assert any(p.startswith("train_mode") for p in problems)
    assert not any(p.startswith("gradient_checkpointing") for p in problems)  # flag set; train_mode says why


def test_settings_differences_listed():
    sc = parse_scenario(YAML, "t.yaml")
    problems = effective.check(sc, {"lora_r": 8, "micro_batch": 4, "optimizer": "sgd", "seq_len": 64})
    assert "lora_r: ran with 8, scenario says 4" in problems
    assert "micro_batch: ran with 4, scenario says 2" in problems
    assert any("optimizer" in p for p in problems) and any("seq_len" in p for p in problems)


def test_read_back_optimizer_tensor_lr():
    """A capturable optimizer (CUDA-graphed trainer) keeps its learning rate as a tensor: read back as a float."""
    import torch

    from harness.measuring.effective import read_back_optimizer

    p = torch.nn.Parameter(torch.zeros(2))
    got = read_back_optimizer(torch.optim.AdamW([p], lr=torch.tensor(2e-4), foreach=False))
    assert got == {"optimizer": "adamw_torch", "lr": pytest.approx(2e-4)} and isinstance(got["lr"], float)
