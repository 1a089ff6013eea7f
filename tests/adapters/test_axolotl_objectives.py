"""The axolotl adapter's preference objectives: DPO, ORPO and KTO through Axolotl's own ``rl:`` configs.

On the CPU (no Axolotl needed): what the adapter declares and what validation refuses (grpo, and what Axolotl's
``rl:`` keys cannot express, each with its reason), the YAML of each objective and the rows written beside it, the
native config saved with the run. With the axolotl environment (``python -m harness env create axolotl`` or its
bundle; skipped otherwise): Axolotl's own config validation and preference-data loader take each generated YAML and
hand the rows on unchanged, in file order. On the GPU (``-m gpu``, the axolotl environment): each objective trained
for real through the harness worker on a small model, the settings read back from the live trainer, the tokens
counted as for TRL's own trainers (synthetic pairs of ``seq_len`` tokens: ``2 x micro_batch x grad_accum x
seq_len`` per step for DPO and ORPO, ``micro_batch x grad_accum x seq_len`` for KTO).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from adapters_for_tools import registry
from adapters_for_tools.axolotl import adapter, rl_config
from adapters_for_tools.contract import RunContext
from harness.inputs import preference
from harness.inputs.data import read_jsonl, write_jsonl
from harness.running import envs
from harness.spec.scenario import parse_scenario
from tests.objective_scenario import LORA, PROMPTS_DATA, needs_env, objective_yaml, refusal

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"
needs_axolotl = needs_env("axolotl")


def scenario(name: str, objective: str, **sections: str) -> str:
    return objective_yaml(name, objective, "[axolotl]", "cuda", baseline="axolotl", **sections)


KINDS = {
    "dpo": "{kind: dpo, loss_type: ipo, beta: 0.2}",
    "orpo": "{kind: orpo, beta: 0.3}",
    "kto": "{kind: kto, desirable_weight: 1.5}",
}


def _sc(kind: str, objective: str | None = None, method: str = LORA):
    return parse_scenario(scenario(f"t_{kind}", objective or KINDS[kind], method=method), "t.yaml")


# -- what the adapter declares, and what validation refuses ----------------------------------------------------------


def test_declares_dpo_orpo_kto_and_grpo_is_refused_with_its_reason():
    info = registry.info("axolotl")
    assert info.objectives == {"sft", "dpo", "orpo", "kto"}
    msg = refusal(scenario("t_grpo", "{kind: grpo, num_generations: 2, max_new_tokens: 4}", data=PROMPTS_DATA))
    assert "axolotl cannot run this scenario: objective 'grpo' not supported" in msg and "vLLM" in msg


@pytest.mark.parametrize(("objective", "method", "why"), [
    ("{kind: kto, loss_type: apo_zero_unpaired}", LORA, "has no loss-type key"),
    ("{kind: kto, reference: precomputed}", LORA, "to its DPO trainer only"),
    ("{kind: kto}", "{kind: full}", "float32 copy of its own"),  # auto: a copy in full fine-tuning
    ("{kind: kto, reference: copy}", LORA, "drops rl_adapter_ref_model"),
    ("{kind: dpo, reference: copy}", LORA, "drops rl_adapter_ref_model"),
])
def test_validate_refuses_what_axolotl_rl_keys_cannot_express(objective, method, why):
    msg = refusal(scenario("t", objective, method=method))
    assert "axolotl cannot run this scenario: " in msg and why in msg


@pytest.mark.parametrize(("objective", "method"), [
    ("{kind: dpo}", LORA), ("{kind: dpo, reference: precomputed}", LORA), ("{kind: dpo, loss_type: hinge}", LORA),
    ("{kind: dpo}", "{kind: full}"), ("{kind: dpo, reference: precomputed}", "{kind: full}"),
    ("{kind: orpo}", LORA), ("{kind: orpo}", "{kind: full}"),
    ("{kind: kto, reference: adapter_disabled, undesirable_weight: 2.0}", LORA),
])
def test_validate_accepts_what_axolotl_runs(objective, method):
    sc = parse_scenario(scenario("t", objective, method=method), "t.yaml")
    assert registry.info("axolotl").cannot_run(sc) is None


# -- Axolotl's own configuration (pure) ------------------------------------------------------------------------------


def test_each_objective_maps_to_axolotls_rl_keys(tmp_path):
    data = tmp_path / "d.jsonl"
    dpo = rl_config.native_config(_sc("dpo"), tmp_path, "/ckpt", data)
    assert (dpo["rl"], dpo["rl_beta"], dpo["dpo_loss_type"], dpo["precompute_ref_log_probs"]) == \
        ("dpo", 0.2, ["ipo"], False)
    assert dpo["datasets"] == [{"path": str(data), "split": "train", "type": {
        "field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected",
        "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}}]
    # the scenario's model, LoRA and optimisation settings, as in the SFT config
    assert (dpo["base_model"], dpo["adapter"], dpo["lora_r"], dpo["lora_alpha"]) == ("/ckpt", "lora", 8, 16)
    assert (dpo["micro_batch_size"], dpo["gradient_accumulation_steps"], dpo["max_steps"]) == (2, 2, 3)
    assert (dpo["sequence_len"], dpo["learning_rate"], dpo["seed"]) == (48, 1.0e-3, 42)
    assert dpo["plugins"] == [rl_config.ORDER_PLUGIN] and dpo["excess_length_strategy"] == "truncate"
    assert dpo["remove_unused_columns"] is False
    assert not set(rl_config.SFT_ONLY) & set(dpo)  # packing, prompt masking, the SFT sampler: SFT's keys only
    orpo = rl_config.native_config(_sc("orpo"), tmp_path, "/ckpt", data)
    assert (orpo["rl"], orpo["rl_beta"]) == ("orpo", 0.3)
    assert orpo["datasets"] == [{"path": str(data), "split": "train"}]  # no type: the rows go to TRL as they are
    assert not {"dpo_loss_type", "precompute_ref_log_probs", "kto_desirable_weight"} & set(orpo)
    kto = rl_config.native_config(_sc("kto"), tmp_path, "/ckpt", data)
    assert (kto["rl"], kto["rl_beta"], kto["kto_desirable_weight"], kto["kto_undesirable_weight"]) == \
        ("kto", 0.1, 1.5, 1.0)
    assert kto["datasets"][0]["type"] == {"field_prompt": "prompt", "field_completion": "completion",
                                          "field_label": "label", "prompt_format": "{prompt}",
                                          "completion_format": "{completion}"}
    assert "dpo_loss_type" not in kto
    for cfg in (dpo, orpo, kto):
        assert yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)) == cfg  # the saved YAML says exactly this


def test_reference_handling_in_the_config(tmp_path):
    pre = rl_config.native_config(_sc("dpo", "{kind: dpo, reference: precomputed}", "{kind: full}"), tmp_path, "/c",
                                  tmp_path / "d.jsonl")
    assert pre["precompute_ref_log_probs"] is True and "adapter" not in pre
    assert rl_config.differences(_sc("dpo", "{kind: dpo, reference: precomputed}", "{kind: full}"))
    assert rl_config.differences(_sc("dpo", "{kind: dpo, reference: precomputed}")) == []
    assert rl_config.differences(_sc("dpo")) == []


def test_rows_keep_the_fields_axolotl_reads_in_file_order():
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "id": i} for i in range(3)]
    assert preference.objective_rows(pairs, "orpo") == [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                     for r in pairs]
    labelled = preference.convert(pairs, preference.PAIRS, "kto")  # chosen labelled good, then rejected bad
    assert preference.objective_rows(labelled, "kto") == labelled
    assert [r["label"] for r in preference.objective_rows(labelled, "kto")] == [True, False] * 3


# -- the native config saved with the run ----------------------------------------------------------------------------


def _ctx(tmp_path: Path, sc, overrides: dict) -> RunContext:
    rows = preference.build_rows(sc).rows
    data = tmp_path / "data.jsonl"
    write_jsonl(rows, data)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    work = tmp_path / "work"
    work.mkdir()
    info = registry.info("axolotl")
    return RunContext(scenario=sc, framework="axolotl", overrides=overrides, repeat=0, checkpoint=str(ckpt),
                      dataset_path=data, work_dir=work, output_dir=work / "output", device="cuda", meter=None,
                      options=info.overrides.model_validate(overrides))


@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto"])
def test_the_native_config_and_its_rows_are_saved_with_the_run(tmp_path, kind):
    ctx = _ctx(tmp_path, _sc(kind), {"axolotl": {"rl_beta": 0.5}})
    cfg = adapter.prepare(ctx)
    saved = Path(ctx.native_config)
    assert saved == ctx.work_dir / "axolotl.yml" and yaml.safe_load(saved.read_text()) == cfg
    assert cfg["rl_beta"] == 0.5  # the row's override over the scenario's
    assert f"axolotl.cli.train {saved}" in ctx.extra["rerun"]
    data_file = Path(cfg["datasets"][0]["path"])
    assert data_file == ctx.work_dir / f"axolotl_{kind}_dataset.jsonl"
    assert read_jsonl(data_file) == preference.objective_rows(read_jsonl(ctx.dataset_path), kind)
    assert ctx.unsupported == [] and "differences" not in ctx.extra


def test_a_liger_row_is_refused_for_an_objective(tmp_path):
    ctx = _ctx(tmp_path, _sc("dpo"), {"liger": True})
    with pytest.raises(ValueError, match="applies to objective sft"):
        adapter.prepare(ctx)
    assert ctx.native_config is None


# -- Axolotl's own validation and data loader (the axolotl environment) ----------------------------------------------


@needs_axolotl
def test_axolotl_takes_each_config_and_hands_the_rows_on_unchanged(tmp_path):
    """Axolotl's ``load_cfg`` validates each generated YAML (no key dropped that the run needs) and its preference
    loader returns the rows of the file the adapter wrote, text unchanged, in file order; the order plugin asks the
    trainer for sequential sampling."""
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    ckpt = prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
    cases = {}
    for kind in KINDS:
        sc = _sc(kind)
        rows = preference.objective_rows(preference.build_rows(sc)[0], kind)
        data_file = tmp_path / f"axolotl_{kind}_dataset.jsonl"
        write_jsonl(rows, data_file)
        cases[kind] = rl_config.native_config(sc, tmp_path / kind, str(ckpt), data_file)
    script = """
import json, sys
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_preference_datasets
from axolotl.integrations.base import PluginManager
from axolotl.utils.dict import DictDefault
out = {}
for kind, cfg in json.loads(sys.argv[1]).items():
    parsed = load_cfg(DictDefault(cfg))
    meta = load_preference_datasets(cfg=parsed)
    ds = meta.train_dataset
    out[kind] = {"rl": str(parsed.rl.value), "rl_beta": parsed.rl_beta, "dpo_loss_type": parsed.dpo_loss_type,
                 "precompute": parsed.precompute_ref_log_probs, "kto": [parsed.kto_desirable_weight,
                 parsed.kto_undesirable_weight], "rows": [{k: ds[i][k] for k in json.loads(sys.argv[2])[kind]}
                                                          for i in range(len(ds))],
                 "training_args": PluginManager.get_instance().get_training_args(parsed)}
print("RESULT " + json.dumps(out))
"""
    env_spec = envs.resolve("axolotl")
    env = dict(os.environ, **env_spec.env_vars, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([*env_spec.pythonpath, str(REPO)]))
    fields = {k: preference.FIELDS[preference.FORM_OF[k]] for k in ("dpo", "orpo", "kto")}
    out = subprocess.run([env_spec.python, "-c", script, json.dumps(cases), json.dumps(fields)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert (got["dpo"]["rl"], got["dpo"]["rl_beta"], got["dpo"]["dpo_loss_type"], got["dpo"]["precompute"]) == \
        ("dpo", 0.2, ["ipo"], False)
    assert (got["orpo"]["rl"], got["orpo"]["rl_beta"]) == ("orpo", 0.3)
    assert (got["kto"]["rl"], got["kto"]["kto"]) == ("kto", [1.5, 1.0])
    for kind in KINDS:
        assert got[kind]["rows"] == read_jsonl(tmp_path / f"axolotl_{kind}_dataset.jsonl"), kind
        assert got[kind]["training_args"] == {"train_sampling_strategy": "sequential"}


# -- the objectives trained for real on the GPU ----------------------------------------------------------------------


def _run(tmp_path, monkeypatch, text: str) -> dict:
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sweep = runner.run_sweep(parse_scenario(text, str(tmp_path / "t.yaml")), tmp_path / "results", new=True,
                             quiet=True)
    res = runner.load_result(sweep, "axolotl", 0)
    assert res["status"] == "ok", (res.get("reason"), (res.get("traceback") or "")[-3000:])
    return res


GPU_TRAIN = "{micro_batch: 4, grad_accum: 2, steps: 4, warmup_steps: 1, lr: 1.0e-4, optimizer: adamw_torch_fused}"


@pytest.mark.gpu
@needs_axolotl
@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto"])
def test_each_objective_on_the_gpu(kind, tmp_path, monkeypatch):
    """bf16 LoRA on small-llama-30m through the harness worker: trains, valid, the objective's settings read back
    from the trainer Axolotl built, every training token counted (synthetic rows of exactly seq_len tokens), the
    reference pass apart, the rows in file order, the YAML and its rows saved with the run."""
    text = scenario(f"gpu_{kind}", KINDS[kind], data="{source: synthetic, seq_len: 256, lengths: fixed}",
                    model="{preset: small-llama-30m, weights: random, dtype: bfloat16}", train=GPU_TRAIN)
    res = _run(tmp_path, monkeypatch, text)
    assert res["valid"], res["invalid_reasons"]
    eff, extra = res["effective"], res["extra"]
    assert eff["objective"] == kind and eff["micro_batch"] == 4 and res["metrics"]["peak_vram_nvml_gib"]
    want = {"dpo": {"beta": 0.2, "loss_type": "ipo", "reference": "adapter_disabled"},
            "orpo": {"beta": 0.3, "reference": "none"},
            "kto": {"beta": 0.1, "loss_type": "kto", "reference": "adapter_disabled", "desirable_weight": 1.5,
                    "undesirable_weight": 1.0}}[kind]
    assert {k: eff[k] for k in want} == want
    sequences = 2 if kind in ("dpo", "orpo") else 1  # chosen and rejected in one forward
    assert [s["tokens"] for s in res["steps"]] == [sequences * 4 * 2 * 256] * 4
    assert ("reference_pass" in extra) == (kind != "orpo") and len(extra["train_rewards"]) == 4
    assert extra["train_sampling_strategy"] == "sequential" and extra["saved"] == "peft adapter"
    work = Path(res["native_config"]).parent
    assert res["native_config"].endswith("axolotl.yml") and (work / f"axolotl_{kind}_dataset.jsonl").exists()
    assert "axolotl.cli.train" in extra["rerun"] and (Path(res["output_dir"]) / "adapter_config.json").exists()


@pytest.mark.gpu
@needs_axolotl
def test_dpo_full_with_a_precomputed_reference_on_the_gpu(tmp_path, monkeypatch):
    text = scenario("gpu_dpo_pre", "{kind: dpo, reference: precomputed}", method="{kind: full}",
                    data="{source: synthetic, seq_len: 256, lengths: fixed}",
                    model="{preset: small-llama-30m, weights: random, dtype: bfloat16}", train=GPU_TRAIN)
    res = _run(tmp_path, monkeypatch, text)
    assert res["valid"], res["invalid_reasons"]
    assert res["effective"]["reference"] == "precomputed"
    ref = res["extra"]["reference_pass"]
    assert ref["tokens_before_training"] >= 2 * 4 * 2 * 4 * 256 and ref["tokens_per_step_mean"] == 0
    assert ref["precompute_s"] > 0 and res["extra"]["differences"]
