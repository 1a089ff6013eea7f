"""litgpt adapter: LitGPT's native configuration (pure) and a real tiny CPU run through the harness.

The CPU run needs the litgpt environment (``python -m harness env create litgpt``; skipped otherwise). Same
checkpoint, data and order as hf (the adapter stores ``train.jsonl`` so that LitGPT's seeded shuffle yields the
harness's order), so every step sees the same tokens; the losses agree to ~2e-3 (measured on 2 CPU cores, 4
steps: |dloss| <= 1.9e-3): LitGPT averages per-micro-batch token means where HF weights tokens across the
accumulation, and LitGPT draws its own LoRA A matrices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_for_tools.litgpt import config as lit_config
from harness.running import envs
from harness.spec.scenario import parse_scenario

TINY_CPU = Path(__file__).resolve().parents[2] / "scenarios" / "tiny_cpu.yaml"

# the runnable variant: LitGPT's single-device scripts have no gradient checkpointing and no clipping
SCENARIO = """
version: 1
name: litgpt_vs_hf_cpu
model: {preset: tiny-llama, weights: random, dtype: float32}
method: {kind: lora, lora_r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: all-linear}
data: {source: synthetic, seq_len: 96, lengths: uniform, min_len: 40}
train: {micro_batch: 2, grad_accum: 2, steps: 4, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: false,
        max_grad_norm: null}
hardware: {device: cpu}
frameworks: [hf, litgpt]
measure: {timeout_s: 600}
"""


def test_native_config_for_tiny_cpu(tmp_path):
    sc = parse_scenario(TINY_CPU.read_text(), str(TINY_CPU))
    cfg = lit_config.native_config(sc, tmp_path / "ckpt", tmp_path / "data", tmp_path / "out", n_train=96)
    assert cfg["precision"] == "32-true" and cfg["devices"] == 1 and cfg["seed"] == 42
    assert "quantize" not in cfg
    assert cfg["train"]["micro_batch_size"] == 4 and cfg["train"]["global_batch_size"] == 8  # accum 2
    assert cfg["train"]["max_steps"] == 12 and cfg["train"]["epochs"] == 1 and cfg["train"]["max_seq_length"] == 128
    assert cfg["train"]["save_interval"] is None
    assert cfg["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": {
        "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}}
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.0)
    assert isinstance(cfg["lora_alpha"], int)  # LitGPT's CLI refuses 16.0
    assert {k: cfg[k] for k in cfg if k.startswith("lora_") and isinstance(cfg[k], bool)} == {
        "lora_query": True, "lora_key": True, "lora_value": True, "lora_projection": True, "lora_mlp": True,
        "lora_head": False}
    data = cfg["data"]
    assert data["class_path"] == "litgpt.data.JSON"
    assert data["init_args"]["prompt_style"] == {"class_path": "litgpt.prompts.Default"}
    assert data["init_args"]["json_path"] == str(tmp_path / "data") and data["init_args"]["mask_prompt"] is True
    assert cfg["eval"]["final_validation"] is False and cfg["eval"]["interval"] > 12
    # tiny_cpu asks for gradient checkpointing and clipping (HF defaults): LitGPT cannot honour them
    assert {s for s, _ in lit_config.cannot_honour(sc)} == {"train.gradient_checkpointing", "train.max_grad_norm"}
    assert "finetune_lora --config" in lit_config.cli_command(sc, tmp_path / "c.yaml")


def test_native_config_qlora_full_and_targets(tmp_path):
    base = TINY_CPU.read_text()
    sc = parse_scenario(base.replace("kind: lora ", "kind: qlora").replace("dtype: float32", "dtype: bfloat16")
                        .replace("device: cpu", "device: cuda"), "q")
    cfg = lit_config.native_config(sc, tmp_path, tmp_path, tmp_path, 96)
    assert cfg["quantize"] == f"bnb.{sc.method.quant.quant_type}" + ("-dq" if sc.method.quant.double_quant else "")
    assert cfg["precision"] == "bf16-true"
    full = parse_scenario(base.replace("kind: lora ", "kind: full"), "f")
    cfg = lit_config.native_config(full, tmp_path, tmp_path, tmp_path, 96)
    assert not any(k.startswith("lora_") for k in cfg) and lit_config.script_name(full) == "finetune_full"
    flags, problems = lit_config.lora_flags(["q_proj", "v_proj", "up_proj"])
    assert flags["lora_query"] and flags["lora_value"] and flags["lora_mlp"] and not flags["lora_key"]
    assert problems and "together" in problems[0]
    assert lit_config.hf_targets(lit_config.lora_flags(["q_proj", "o_proj"])[0]) == ["o_proj", "q_proj"]


def test_model_config_and_rows():
    from harness.inputs.models import get_preset, model_config_dict

    hf = model_config_dict(get_preset("tiny-llama"), "float32")
    mc = lit_config.model_config(hf, "tunebench-x")
    assert (mc["n_layer"], mc["n_embd"], mc["n_head"], mc["n_query_groups"], mc["head_size"]) == (2, 64, 4, 2, 16)
    assert mc["mlp_class_name"] == "LLaMAMLP" and mc["norm_class_name"] == "RMSNorm" and mc["padded_vocab_size"] == 320
    assert mc["rope_adjustments"]["original_max_seq_len"] == 256
    rows, notes = lit_config.convert_rows([{"text": "ab cd"}], "text")
    assert rows == [{"instruction": "", "output": "ab cd"}] and notes == []
    rows, _ = lit_config.convert_rows([{"instruction": "do", "input": "", "output": "done"}], "alpaca")
    assert rows[0]["output"] == "done" and rows[0]["instruction"].endswith("### Response:\n")


@pytest.mark.slow
@pytest.mark.skipif(not envs.resolve("litgpt").ready,
                    reason="litgpt environment not created: run `python -m harness env create litgpt`")
def test_litgpt_matches_hf_on_cpu(tmp_path, monkeypatch):
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sc = parse_scenario(SCENARIO, "litgpt_vs_hf_cpu.yaml")
    sweep = runner.run_sweep(sc, tmp_path / "results", new=True, quiet=True)
    hf, lit = runner.load_result(sweep, "hf", 0), runner.load_result(sweep, "litgpt", 0)
    assert hf["status"] == "ok", hf.get("reason")
    assert lit["status"] == "ok", lit.get("reason")
    assert lit["valid"], lit["invalid_reasons"]
    assert lit["framework_version"] == "0.5.13"
    assert lit["native_config"].endswith("litgpt_finetune.yaml")
    assert "-m litgpt finetune_lora --config" in lit["extra"]["rerun"]
    assert Path(lit["output_dir"], "final", "lit_model.pth.lora").is_file()
    for a, b in zip(hf["steps"], lit["steps"], strict=True):
        assert (a["tokens"], a["loss_tokens"], a["samples"]) == (b["tokens"], b["loss_tokens"], b["samples"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-2)  # measured <= 1.9e-3
    keys = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "trainable_params", "total_params",
            "gradient_checkpointing", "optimizer", "lr", "dtype", "train_mode", "micro_batch", "grad_accum")
    assert {k: lit["effective"].get(k) for k in keys} == {k: hf["effective"].get(k) for k in keys}
