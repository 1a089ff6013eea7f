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


def _dpo_scenario():
    from tests.objective_scenario import objective_yaml
    return parse_scenario(objective_yaml("t_dpo", "{kind: dpo}", "[trl]", "cpu"), "t.yaml")


def test_a_frozen_copy_of_the_untrained_adapter_is_the_reference_disabled_adapters_give(lora_model):
    """TRL's "ref" adapter beside a policy that arrives wrapped (Unsloth's recipe), copied as TRL copies it: untrained
    (every lora_B zero) it is the base model, the scenario's adapter_disabled; a trained copy is another reference."""
    import torch

    from adapters_for_tools.objective_meter import peft_reference

    sc = _dpo_scenario()
    assert peft_reference(lora_model) == "adapter_disabled"
    lora_model.add_adapter("ref", lora_model.peft_config["default"])
    for name, p in lora_model.named_parameters():
        if ".default." in name:
            lora_model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(p.data)
    got = peft_reference(lora_model)
    assert got == "ref_adapter_untrained" and effective.check(sc, {"reference": got}) == []
    with torch.no_grad():
        next(p for n, p in lora_model.named_parameters() if ".lora_B.ref." in n)[0, 0] = 1e-3
    got = peft_reference(lora_model)
    assert got == "ref_adapter"
    assert effective.check(sc, {"reference": got}) == ["reference: ran with 'ref_adapter', scenario says "
                                                       "'adapter_disabled'"]


def test_the_reports_settings_table_marks_what_check_marks():
    from harness.reporting.tables import setting_differs

    for got in ("ref_adapter_untrained", "adapter_disabled", "ref_adapter", "copy"):
        flagged = bool(effective.check(_dpo_scenario(), {"reference": got}))
        assert setting_differs("reference", "adapter_disabled", got) is flagged
    assert setting_differs("optimizer", "adamw_torch_fused", "adamw_torch") is False


def test_a_tool_that_cuts_rows_shorter_than_the_data_is_flagged():
    """A row whose widest trained row is well short of the widest row the steps read (a max_length of the tool's
    own): another job. A <bos> or <eos> of difference passes; unknown figures cannot fail it."""
    from harness.measuring.effective import cut_shorter

    assert cut_shorter({"seq_len": 4}, 124) == ["seq_len: its widest row had 4 tokens, the rows the steps read "
                                                "reach 124 within the scenario's seq_len: it cut them shorter"]
    assert cut_shorter({"seq_len": 123}, 124) == [] and cut_shorter({"seq_len": 18}, 20) == []
    assert cut_shorter({"seq_len": 100}, 124) != []
    assert cut_shorter({}, 124) == [] and cut_shorter({"seq_len": 4}, None) == []


def test_the_widest_row_is_of_the_rows_the_steps_read():
    from harness.inputs import data
    from harness.inputs.models import build_tokenizer  # transformers: heavy
    from harness.spec.scenario import parse_scenario

    sc = parse_scenario("version: 1\nname: t\nmodel: {preset: tiny-llama, dtype: float32}\nmethod: {kind: lora}\n"
                        "data: {seq_len: 64}\ntrain: {micro_batch: 2, steps: 2, warmup_steps: 1}\n"
                        "hardware: {device: cpu}\nframeworks: [hf]\n", "s.yaml")
    rows = [{"text": "a" * n} for n in (10, 20, 30, 40, 500)]  # the steps read the first 4
    ex = data.Examples(rows, "text", 0, 1)
    assert data.widest_row(sc, ex, build_tokenizer(300)) == 42  # <bos> + 40 + <eos>
    sc.train.steps = 3
    assert data.widest_row(sc, ex, build_tokenizer(300)) == 64  # the fifth, cut at seq_len


def test_conversation_rows_record_which_tokens_bear_loss():
    """The dataset's meta names the loss rule of conversation rows (`compare` tells runs on another apart); text and
    Alpaca rows have none."""
    from harness.inputs import data

    sc = parse_scenario("version: 1\nname: t\nmodel: {preset: tiny-llama, dtype: float32}\nmethod: {kind: lora}\n"
                        "data: {seq_len: 64}\ntrain: {micro_batch: 2, steps: 2, warmup_steps: 1}\n"
                        "hardware: {device: cpu}\nframeworks: [hf]\n", "s.yaml")
    for fmt in ("messages", "sharegpt"):
        assert data.dataset_meta(sc, data.Examples([], fmt, 0, 1))["loss_rule"] == data.LOSS_RULE == 2
    for fmt in ("text", "alpaca"):
        assert "loss_rule" not in data.dataset_meta(sc, data.Examples([], fmt, 0, 1))
