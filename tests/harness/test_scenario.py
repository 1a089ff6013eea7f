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
    other = two.replace("[hf, tunebench]", "[hf, {name: tunebench, label: tb-fast, overrides: {x: 1}}]")
    # other rows, the description and the report's baseline are not settings of hf's runs ...
    assert h(GOOD) == h(two) == h(other) == h(two.replace("name: t\n", "name: t\ndescription: edited\n"))
    assert h(two) == h(two + "measure:\n  baseline: tunebench\n  repeats: 3\n")
    assert parse_scenario(two, "s.yaml").content_hash() != parse_scenario(other, "s.yaml").content_hash()
    # ... while the shared settings and the row's own entry are
    assert h(GOOD) != h(GOOD.replace("steps: 4", "steps: 5"))
    assert h(two, "tunebench") != h(two.replace("[hf, tunebench]", "[hf, {name: tunebench, overrides: {x: 1}}]"),
                                    "tunebench")
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
