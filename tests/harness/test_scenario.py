"""Scenario validation: every shipped scenario loads; bad input fails early with file:line: key: reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.spec.scenario import ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
version: 1
name: t
model:
  preset: tiny-llama
  dtype: float32
method:
  kind: lora
  lora_r: 4
data:
  seq_len: 64
train:
  micro_batch: 2
  steps: 4
  warmup_steps: 1
hardware:
  device: cpu
frameworks: [hf]
"""


def _err(text: str) -> str:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(text, "s.yaml")
    return str(ei.value)


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_loads(path):
    sc = load_scenario(path)
    assert sc.version == 1 and sc.frameworks


def test_good_scenario_defaults_filled():
    sc = parse_scenario(GOOD, "s.yaml")
    assert sc.method.resolved_targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]
    assert sc.train.grad_accum == 1 and sc.measure.repeats == 1
    assert sc.content_hash() == parse_scenario(GOOD, "other.yaml").content_hash()


def test_settings_hash_covers_one_framework_row():
    def h(text: str, fw: str = "hf") -> str:
        return parse_scenario(text, "s.yaml").settings_hash(fw)

    two = GOOD.replace("frameworks: [hf]", "frameworks: [hf, tunebench]")
    other = two.replace("[hf, tunebench]", "[hf, {name: tunebench, label: tb-fast, overrides: {recompute_layers: 1}}]")
    # other rows, the description and the report's baseline are not settings of hf's runs ...
    assert h(GOOD) == h(two) == h(other) == h(two.replace("name: t\n", "name: t\ndescription: edited\n"))
    assert h(two) == h(two + "measure:\n  baseline: tunebench\n  repeats: 3\n")
    assert parse_scenario(two, "s.yaml").content_hash() != parse_scenario(other, "s.yaml").content_hash()
    # ... while the shared settings and the row's own entry are
    assert h(GOOD) != h(GOOD.replace("steps: 4", "steps: 5"))
    tuned = two.replace("[hf, tunebench]", "[hf, {name: tunebench, overrides: {recompute_layers: 1}}]")
    assert h(two, "tunebench") != h(tuned, "tunebench")
    assert h(other, "tb-fast") != h(two, "tunebench")
    with pytest.raises(KeyError, match="'trl' is not a framework"):
        h(GOOD, "trl")


def test_unknown_key_has_line_and_suggestion():
    msg = _err(GOOD.replace("  lora_r: 4", "  lora_rank: 4"))
    assert msg.startswith("s.yaml:8: method.lora_rank: unknown key")
    assert "did you mean 'lora_r'" in msg


def test_wrong_type_reports_key_and_line():
    msg = _err(GOOD.replace("micro_batch: 2", "micro_batch: two"))
    assert "s.yaml:12: train.micro_batch:" in msg and "integer" in msg


def test_warmup_not_below_steps():
    msg = _err(GOOD.replace("warmup_steps: 1", "warmup_steps: 4"))
    assert "train" in msg and "warmup_steps (4) must be < steps (4)" in msg


def test_qlora_on_cpu_is_impossible():
    msg = _err(GOOD.replace("kind: lora", "kind: qlora"))
    assert "s.yaml:7: method.kind: qlora needs" in msg


def test_seq_len_beyond_model_maximum():
    msg = _err(GOOD.replace("seq_len: 64", "seq_len: 4096"))
    assert "data.seq_len: 4096 is beyond the model's maximum (2048" in msg


def test_unknown_framework_did_you_mean():
    msg = _err(GOOD.replace("frameworks: [hf]", "frameworks: [hff]"))
    assert "s.yaml:17: frameworks[0]: unknown framework 'hff'; did you mean 'hf'?" in msg


def test_unknown_preset_and_version():
    msg = _err(GOOD.replace("preset: tiny-llama", "preset: tiny-lama").replace("version: 1", "version: 7"))
    assert "version: unsupported schema version 7" in msg


def test_unknown_preset():
    msg = _err(GOOD.replace("preset: tiny-llama", "preset: tiny-lama"))
    assert "model.preset: unknown preset 'tiny-lama'; did you mean 'tiny-llama'?" in msg


def test_yaml_syntax_error_has_line():
    msg = _err(GOOD + "  bad: [unclosed\n")
    assert msg.startswith("s.yaml:") and "<yaml>" in msg


def test_several_problems_reported_together():
    msg = _err(GOOD.replace("lora_r: 4", "lora_r: 0").replace("micro_batch: 2", "micro_batch: -1"))
    assert "method.lora_r" in msg and "train.micro_batch" in msg


def test_quant_only_for_qlora():
    msg = _err(GOOD.replace("  lora_r: 4", "  lora_r: 4\n  quant: {bits: 4}"))
    assert "quant` applies to qlora only" in msg


def test_prequantized_checkpoint_needs_qlora(tmp_path):
    ckpt = tmp_path / "llama-bnb-4bit"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama", "quantization_config": '
                                      '{"quant_method": "bitsandbytes", "load_in_4bit": true}}')
    (ckpt / "model.safetensors").write_bytes(b"")  # validation checks that a local checkpoint has weight files
    text = GOOD.replace("  preset: tiny-llama\n", f"  weights: {ckpt}\n")
    msg = _err(text)
    assert "s.yaml:7: method.kind: lora: the checkpoint in model.weights is bitsandbytes-quantised (4-bit)" in msg
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    parse_scenario(text, "s.yaml")  # a plain local checkpoint trains with lora


def test_cli_validate_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("steps: 4", "steps: 4\n  stepz: 3"))
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    run = lambda *a: subprocess.run([sys.executable, "-m", "harness", *a], cwd=REPO, capture_output=True, text=True)
    r = run("validate", str(good))
    assert r.returncode == 0, r.stderr
    r = run("validate", str(bad))
    assert r.returncode == 2
    assert f"{bad}:14: train.stepz: unknown key" in r.stderr
    r = run("run", str(bad))  # nothing starts half-configured
    assert r.returncode == 2 and "train.stepz" in r.stderr
    r = run("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_unknown_framework_beside_explicit_targets():
    """Explicit target_modules and a misspelled framework: file:line and "did you mean", not a TypeError."""
    text = GOOD.replace("  lora_r: 4", "  lora_r: 4\n  target_modules: [q_proj, v_proj]")
    msg = _err(text.replace("frameworks: [hf]", "frameworks: [hff]"))
    assert "s.yaml:18: frameworks[0]: unknown framework 'hff'; did you mean 'hf'?" in msg
    msg = _err(text.replace("v_proj]", "vproj]"))
    assert "s.yaml:9: method.target_modules: ['vproj'] are not linear modules of tiny-llama" in msg


TUNEBENCH_ROWS = GOOD.replace("frameworks: [hf]", """\
frameworks:
  - hf
  - name: tunebench
    label: tb-fast
    overrides:
      recompute_layers: 1""")


def test_overrides_typo_has_line_and_suggestion():
    assert parse_scenario(TUNEBENCH_ROWS, "s.yaml").frameworks[1].overrides == {"recompute_layers": 1}
    msg = _err(TUNEBENCH_ROWS.replace("recompute_layers: 1", "recompute_layer: 1"))
    assert msg.startswith("s.yaml:22: frameworks.tb-fast.overrides.recompute_layer: unknown tunebench override "
                          "'recompute_layer'; did you mean 'recompute_layers'?"), msg
    # the short form names the row by its adapter
    msg = _err(GOOD.replace("frameworks: [hf]", "frameworks: [{name: tunebench, overrides: {cuda_graphs: true}}]"))
    assert "s.yaml:17: frameworks.tunebench.overrides.cuda_graphs: unknown tunebench override 'cuda_graphs'; " \
           "did you mean 'cuda_graph'?" in msg


@pytest.mark.parametrize(("value", "where", "reason"), [
    ("recompute_layers: '1'", "recompute_layers", "valid integer"),
    ("recompute_layers: 0", "recompute_layers", "would switch gradient checkpointing off"),
    ("offload_weights: -2", "offload_weights", "greater than or equal to -1"),
    ("cuda_graph: 1", "cuda_graph", "valid boolean"),
    ("reference_ops: [rope, swiglue]", "reference_ops[1]", "'swiglu'"),
    ("lora_dtype: float16", "lora_dtype", "'bfloat16'"),
])
def test_overrides_mistyped_value(value, where, reason):
    msg = _err(TUNEBENCH_ROWS.replace("recompute_layers: 1", value))
    assert msg.startswith(f"s.yaml:22: frameworks.tb-fast.overrides.{where}: "), msg
    assert reason in msg


def test_every_adapter_checks_its_overrides():
    from adapters_for_tools import registry

    for name in registry.names():
        text = GOOD.replace("frameworks: [hf]", f"frameworks: [{{name: {name}, overrides: {{no_such_knob: 1}}}}]")
        text = text.replace("device: cpu", "device: cuda")
        msg = _err(text)
        assert f"frameworks.{name}.overrides.no_such_knob: unknown {name} override 'no_such_knob'" in msg


def test_cli_validate_names_the_override_and_the_framework(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "harness", *a], cwd=REPO, capture_output=True, text=True)
    typo = tmp_path / "typo.yaml"
    typo.write_text(TUNEBENCH_ROWS.replace("recompute_layers: 1", "recompute_layer: 1"))
    r = run("validate", str(typo))
    assert r.returncode == 2, r.stderr
    assert f"{typo}:22: frameworks.tb-fast.overrides.recompute_layer: " in r.stderr
    assert "did you mean 'recompute_layers'?" in r.stderr
    shadow = tmp_path / "shadow.yaml"
    shadow.write_text(GOOD.replace("  lora_r: 4", "  lora_r: 4\n  target_modules: [q_proj, v_proj]")
                      .replace("frameworks: [hf]", "frameworks: [hff]"))
    r = run("validate", str(shadow))
    assert r.returncode == 2, r.stderr
    assert f"{shadow}:18: frameworks[0]: unknown framework 'hff'; did you mean 'hf'?" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("scenario", "value", "where", "reasons"), [
    ("", "cuda_graph: true", "cuda_graph", ["a CUDA device"]),
    ("  lora_dropout: 0.1\n", "remake_mlp_layers: -1", "remake_mlp_layers", ["method.lora_dropout 0"]),
    ("", "remake_mlp_layers: 2\n      remake_activations: false", "remake_mlp_layers", ["remake_activations"]),
    ("", "remake_mlp_layers: 2\n      mlp_chunk_tokens: 16", "remake_mlp_layers", ["no mlp_chunk_tokens"]),
    ("mixtral", "remake_mlp_layers: -1", "remake_mlp_layers", ["a dense MLP"]),
    ("ddp", "plan: 12.0", "plan", ["one process (not hardware.strategy ddp)"]),
    ("ddp", "offload_embeddings: true", "offload_embeddings", ["one process (not hardware.strategy ddp)"]),
    ("ddp", "mlp_chunk_tokens: 16", "mlp_chunk_tokens", ["one process (not hardware.strategy ddp)"]),
    ("dpo", "offload_weights: 1", "offload_weights", ["no dpo objective"]),
    ("dpo", "cuda_graph: true", "cuda_graph", ["a CUDA device", "the sft objective"]),
    ("", "plan: auto", "plan", ["for auto, a CUDA device", "give a budget in GiB"]),
    ("", "cuda_graph: true\n      offload_checkpoints: true", "cuda_graph", ["not offload_checkpoints"]),
    ("full", "offload_lm_head: true", "offload_lm_head", ["frozen weights"]),
    ("full", "offload_weights: 2", "offload_weights", ["method lora or dora"]),
    ("no-ckpt", "offload_weights: 2", "offload_weights", ["train.gradient_checkpointing"]),
])
def test_knobs_the_scenario_rules_out_are_refused_at_validation(scenario, value, where, reasons):
    """A tunebench knob valid on its own but not with this scenario's settings names the knob, before anything runs
    (not as a failed run later); the same knob passes where the scenario allows it."""
    base = TUNEBENCH_ROWS
    if scenario == "mixtral":
        base = base.replace("preset: tiny-llama", "preset: tiny-mixtral").replace("lora_r: 4", "lora_r: 4\n"
                                                                                  "  target_modules: [q_proj]")
    elif scenario == "ddp":
        base = base.replace("  device: cpu\n", "  device: cpu\n  gpus: 2\n  strategy: ddp\n")
    elif scenario == "full":
        base = base.replace("  kind: lora\n  lora_r: 4\n", "  kind: full\n")
    elif scenario == "no-ckpt":
        base = base.replace("  warmup_steps: 1\n", "  warmup_steps: 1\n  gradient_checkpointing: false\n")
    elif scenario == "dpo":
        base = base.replace("frameworks:\n  - hf\n", "objective: {kind: dpo}\nframeworks:\n  - trl\n")
    elif scenario:
        base = base.replace("  lora_r: 4\n", "  lora_r: 4\n" + scenario)
    msg = _err(base.replace("recompute_layers: 1", value))
    line = 22 + base.count("\n") - TUNEBENCH_ROWS.count("\n")
    assert f"s.yaml:{line}: frameworks.tb-fast.overrides.{where}: " in msg, msg
    assert all(r in msg for r in reasons), msg
    allowed = TUNEBENCH_ROWS.replace("recompute_layers: 1", "recompute_layers: 1\n      remake_mlp_layers: -1")
    assert parse_scenario(allowed, "s.yaml").frameworks[1].overrides["remake_mlp_layers"] == -1
