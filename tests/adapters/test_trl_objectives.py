"""The trl adapter's preference and RL objectives: TRL's own configuration for DPO, ORPO, KTO and GRPO (pure),
parsed by TRL's own parser, and each objective trained for real on the CPU through the harness.

The runs need the trl environment (``python -m harness env create trl``; skipped with that message otherwise).
Synthetic pairs with ``lengths: fixed`` are ``seq_len`` tokens per sequence with the byte-level tokenizer, so the
tokens a step must count are known exactly: ``2 x micro_batch x grad_accum x seq_len`` for DPO and ORPO (chosen
and rejected), ``micro_batch x grad_accum x seq_len`` for KTO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_for_tools.objective_meter import loads_reference_copy
from adapters_for_tools.trl import rl_config
from harness.running import envs
from harness.spec.scenario import parse_scenario
from tests.objective_scenario import PROMPTS_DATA, needs_env, objective_yaml

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"
needs_trl = needs_env("trl")


def scenario(name: str, objective: str, **sections: str) -> str:
    return objective_yaml(name, objective, "[trl]", "cpu", baseline="trl", **sections)


KINDS = {
    "dpo": "{kind: dpo, loss_type: ipo, beta: 0.2}",
    "orpo": "{kind: orpo}",
    "kto": "{kind: kto, desirable_weight: 1.5}",
    "grpo": "{kind: grpo, num_generations: 2, max_new_tokens: 4, beta: 0.04}",
}


def _sc(kind: str):
    data = (PROMPTS_DATA if kind == "grpo"
            else "{source: synthetic, seq_len: 48, lengths: fixed}")
    return parse_scenario(scenario(f"t_{kind}", KINDS[kind], data=data), "t.yaml")


# -- the native configuration (pure) -------------------------------------------------------------------------------


def test_each_objective_maps_one_to_one(tmp_path):
    dpo = rl_config.native_config(_sc("dpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert (dpo["beta"], dpo["loss_type"], dpo["precompute_ref_log_probs"]) == (0.2, ["ipo"], False)
    assert dpo["max_length"] == 48 and dpo["train_sampling_strategy"] == "sequential"
    assert (dpo["per_device_train_batch_size"], dpo["gradient_accumulation_steps"], dpo["max_steps"]) == (2, 2, 3)
    assert dpo["use_peft"] and dpo["lora_r"] == 8 and dpo["datasets"][0]["data_files"] == str(tmp_path / "d.jsonl")
    orpo = rl_config.native_config(_sc("orpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert orpo["beta"] == 0.1 and "loss_type" not in orpo and "precompute_ref_log_probs" not in orpo
    kto = rl_config.native_config(_sc("kto"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert (kto["loss_type"], kto["desirable_weight"], kto["undesirable_weight"]) == ("kto", 1.5, 1.0)
    grpo = rl_config.native_config(_sc("grpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert (grpo["num_generations"], grpo["max_completion_length"], grpo["temperature"], grpo["beta"]) == \
        (2, 4, 1.0, 0.04)
    assert grpo["reward_funcs"] == ["harness.inputs.preference.exact_match_reward"]
    assert grpo["shuffle_dataset"] is False and grpo["loss_type"] == "grpo" and "max_length" not in grpo
    assert rl_config.SCRIPTS["orpo"] == "adapters_for_tools.trl.rerun_orpo"


def test_reference_handling_in_the_config():
    full = parse_scenario(scenario("t", "{kind: dpo, reference: precomputed}", method="{kind: full}"), "t.yaml")
    assert rl_config.native_config(full, Path("/w"), "/c", Path("/d"))["precompute_ref_log_probs"] is True
    copy = parse_scenario(scenario("t", "{kind: kto, reference: copy}"), "t.yaml")
    assert loads_reference_copy(copy) and not loads_reference_copy(_sc("kto"))
    grpo_copy = parse_scenario(scenario("t", "{kind: grpo, num_generations: 2, beta: 0.1, reference: copy}",
                                        data=f"{{source: jsonl, path: {TASKS / 'tb_prompts_add.jsonl'}, "
                                             "seq_len: 96}"), "t.yaml")
    assert [s for s, _ in rl_config.cannot_honour(grpo_copy)] == ["objective.reference"]


@needs_trl
def test_trl_parses_every_objective_config(tmp_path):
    """TRL's own parser takes each generated YAML with no key left over (allow_extra_keys=False)."""
    script = f"""
import json, sys
from pathlib import Path
from harness.spec.scenario import parse_scenario
from adapters_for_tools.objective_meter import loads_reference_copy
from adapters_for_tools.trl import rl_config
from adapters_for_tools.trl.objectives import _argument_classes
from trl import DatasetMixtureConfig, ModelConfig, TrlParser
for kind, text in json.loads(sys.argv[1]).items():
    sc = parse_scenario(text, "t.yaml")
    cfg = rl_config.native_config(sc, Path({str(tmp_path)!r}), "/ckpt", Path("/d.jsonl"))
    script_cls, config_cls = _argument_classes(kind)
    parsed = TrlParser((script_cls, config_cls, ModelConfig, DatasetMixtureConfig)).parse_dict(cfg)
    print(kind, type(parsed[1]).__name__, parsed[1].beta)
"""
    texts = {k: scenario(f"t_{k}", v, data=(PROMPTS_DATA
                                            if k == "grpo" else "{source: synthetic, seq_len: 48}"))
             for k, v in KINDS.items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*envs.resolve("trl").pythonpath, str(REPO)]))
    out = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert {ln.split()[0]: ln.split()[1] for ln in lines if ln} == {
        "dpo": "DPOConfig", "orpo": "ORPOConfig", "kto": "KTOConfig", "grpo": "GRPOConfig"}


# -- the objectives trained for real (slow: a sweep each) ------------------------------------------------------------


def _run(tmp_path, monkeypatch, text: str) -> dict:
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sweep = runner.run_sweep(parse_scenario(text, str(tmp_path / "t.yaml")), tmp_path / "results", new=True,
                             quiet=True)
    res = runner.load_result(sweep, "trl", 0)
    assert res["status"] == "ok", (res.get("reason"), (res.get("traceback") or "")[-3000:])
    return res


@pytest.mark.slow
@needs_trl
def test_dpo_lora_counts_both_sequences_and_the_reference_apart(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, scenario(
        "dpo_lora", f"{{kind: dpo, beta: 0.1, eval_pairs: {TASKS / 'tb_pref_eval_last.jsonl'}}}"))
    assert res["valid"], res["invalid_reasons"]
    assert [s["tokens"] for s in res["steps"]] == [2 * 2 * 2 * 48] * 3  # chosen + rejected, 2 pairs x 2 micro-batches
    assert all(s["rows"] == 4 and s["micro_batches"] == 2 for s in res["steps"])
    eff = res["effective"]
    assert (eff["objective"], eff["beta"], eff["loss_type"], eff["reference"], eff["micro_batch"]) == \
        ("dpo", 0.1, "sigmoid", "adapter_disabled", 2)
    ref = res["extra"]["reference_pass"]
    assert ref["tokens_per_step_mean"] == 2 * 2 * 2 * 48 and ref["tokens_before_training"] == 0
    assert len(res["extra"]["train_rewards"]) == 3 and "accuracy" in res["extra"]["train_rewards"][-1]
    assert res["native_config"].endswith("trl_dpo.yaml") and "trl.scripts.dpo --config" in res["extra"]["rerun"]
    assert (Path(res["native_config"]).parent / "trl_dpo_dataset.jsonl").exists()
    assert res["reward_eval"]["status"] == "ok" and res["reward_eval"]["pairs"] == 100


@pytest.mark.slow
@needs_trl
def test_dpo_full_with_a_precomputed_reference(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, scenario("dpo_pre", "{kind: dpo, reference: precomputed}",
                                               method="{kind: full}"))
    assert res["valid"], res["invalid_reasons"]
    assert res["effective"]["reference"] == "precomputed"
    ref = res["extra"]["reference_pass"]
    assert ref["tokens_before_training"] >= 2 * 12 * 48 and ref["tokens_per_step_mean"] == 0  # 12 pairs, before step 1


@pytest.mark.slow
@needs_trl
def test_kto_with_a_reference_copy_beside_the_adapters(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, scenario("kto_copy", "{kind: kto, reference: copy, undesirable_weight: 2.0}"))
    assert res["valid"], res["invalid_reasons"]
    assert [s["tokens"] for s in res["steps"]] == [2 * 2 * 48] * 3  # labelled completions, 2 x 2 per step
    eff = res["effective"]
    assert (eff["reference"], eff["undesirable_weight"], eff["micro_batch"]) == ("copy", 2.0, 2)
    assert res["extra"]["reference_pass"]["tokens_per_step_mean"] > 0  # the copy's forwards and the KL estimate


@pytest.mark.slow
@needs_trl
def test_orpo_has_no_reference_pass(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, scenario("orpo", "{kind: orpo, beta: 0.2}"))
    assert res["valid"], res["invalid_reasons"]
    assert [s["tokens"] for s in res["steps"]] == [2 * 2 * 2 * 48] * 3
    assert (res["effective"]["reference"], res["effective"]["beta"]) == ("none", 0.2)
    assert "reference_pass" not in res["extra"] and "rerun_orpo --config" in res["extra"]["rerun"]


@pytest.mark.slow
@needs_trl
def test_grpo_samples_rewards_and_times_generation(tmp_path, monkeypatch):
    """A tiny model warm-started briefly on the last-letter task (it answers some prompts right, most wrong: a
    longer warm start answers all of them, and equal rewards in a group give GRPO nothing to learn from), then GRPO
    on the same task's prompts: rewards, generation timed apart, samples counted."""
    warm = f"{{data: {TASKS / 'tb_train_last.jsonl'}, steps: 40, micro_batch: 16, lr: 3.0e-3, seq_len: 96}}"
    res = _run(tmp_path, monkeypatch, scenario(
        "grpo", "{kind: grpo, num_generations: 4, max_new_tokens: 3}", method="{kind: full}",
        model=f"{{preset: quality-tiny, weights: random, dtype: float32, warm_start: {warm}}}",
        data=f"{{source: jsonl, path: {TASKS / 'tb_train_last.jsonl'}, seq_len: 96}}",
        train="{micro_batch: 16, grad_accum: 1, steps: 4, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: false}"))
    assert res["valid"], res["invalid_reasons"]
    eff = res["effective"]
    assert (eff["objective"], eff["num_generations"], eff["max_new_tokens"], eff["reward"], eff["reference"]) == \
        ("grpo", 4, 3, "exact_match", "none")
    curve = res["extra"]["reward_curve"]
    assert len(curve) == 4 and max(p["reward"] for p in curve) > 0  # the warm-started model answers some prompts
    gen = res["extra"]["generation"]
    assert all(g["completions"] == 16 and 16 <= g["generated_tokens"] <= 48 for g in gen["per_step"])
    assert 0 < gen["generation_fraction"] < 1 and gen["generated_tokens_per_s"] > 0
    assert all(s["rows"] == 16 and s["loss_tokens"] <= 16 * 3 for s in res["steps"])
    assert res["metrics"]["samples_per_s"] > 0


@pytest.mark.gpu
@needs_trl
@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto", "grpo"])
def test_each_objective_on_the_gpu(kind, tmp_path, monkeypatch):
    """The GPU path of each objective, bf16 LoRA on small-llama-30m, a few steps: trains, valid, memory measured."""
    data = (PROMPTS_DATA if kind == "grpo"
            else "{source: synthetic, seq_len: 256, lengths: fixed}")
    objective = "{kind: grpo, num_generations: 4, max_new_tokens: 8, beta: 0.04}" if kind == "grpo" else KINDS[kind]
    text = scenario(f"gpu_{kind}", objective, data=data,
                    model="{preset: small-llama-30m, weights: random, dtype: bfloat16}",
                    train="{micro_batch: 4, grad_accum: 1, steps: 4, warmup_steps: 1, lr: 1.0e-4, "
                          "optimizer: adamw_torch_fused}").replace("device: cpu", "device: cuda")
    res = _run(tmp_path, monkeypatch, text)
    # a random model's GRPO rewards are all 0, so its loss may not move: the grpo row is checked for what ran
    assert res["valid"] or (kind == "grpo" and all("loss never moved" in r for r in res["invalid_reasons"])), \
        res["invalid_reasons"]
    assert res["effective"]["objective"] == kind and res["metrics"]["peak_vram_nvml_gib"]
    assert res["effective"]["reference"] == {"dpo": "adapter_disabled", "kto": "adapter_disabled", "orpo": "none",
                                             "grpo": "adapter_disabled"}[kind]
    if kind == "grpo":
        assert res["extra"]["generation"]["generated_tokens_per_s"] > 0


@pytest.mark.gpu
@needs_trl
def test_shipped_gpu_objective_configs_parse(tmp_path):
    """The 8B and GRPO scenarios' TRL configurations (bf16: TRL refuses it without a GPU) parse with TRL's parser."""
    script = f"""
import sys
from pathlib import Path
from harness.spec.scenario import load_scenario
from adapters_for_tools.objective_meter import loads_reference_copy
from adapters_for_tools.trl import rl_config
from adapters_for_tools.trl.objectives import _argument_classes
from trl import DatasetMixtureConfig, ModelConfig, TrlParser
for path in sys.argv[1:]:
    sc = load_scenario(path)
    cfg = rl_config.native_config(sc, Path({str(tmp_path)!r}), "/ckpt", Path("/d.jsonl"))
    script_cls, config_cls = _argument_classes(sc.objective.kind)
    TrlParser((script_cls, config_cls, ModelConfig, DatasetMixtureConfig)).parse_dict(cfg)
"""
    names = ("llama8b_dpo", "llama8b_orpo", "llama8b_kto", "grpo_small")
    paths = [str(REPO / "scenarios" / f"{n}.yaml") for n in names]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*envs.resolve("trl").pythonpath, str(REPO)]))
    out = subprocess.run([sys.executable, "-c", script, *paths], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
