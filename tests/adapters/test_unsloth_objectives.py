"""The unsloth adapter's preference and RL objectives: DPO, ORPO, KTO and GRPO through the TRL trainers Unsloth
patches.

On the CPU (no Unsloth needed): what the adapter declares, Unsloth's own
configuration of each objective (pure), the native config saved with the run, the keys checked against TRL's own
config classes (the trl environment), and GRPO's training micro-batches counted from the loss inputs the same way as
TRL's forward. On the GPU (``-m gpu``, the unsloth environment: ``python -m harness env create unsloth`` or its
bundle): each objective trained for real through the harness worker on a small model, with the settings read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapters_for_tools import registry
from adapters_for_tools.contract import RunContext
from adapters_for_tools.objective_meter import ObjectiveMeter
from adapters_for_tools.unsloth import objectives, rl_config
from harness.inputs import preference
from harness.inputs.data import read_jsonl, write_jsonl
from harness.measuring.effective import same_setting
from harness.measuring.meter import StepMeter
from harness.running import envs
from harness.spec.scenario import load_scenario, parse_scenario
from tests.objective_scenario import PROMPTS_DATA, needs_env, objective_yaml

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"
needs_unsloth, needs_trl = needs_env("unsloth"), needs_env("trl")


def scenario(name: str, objective: str, **sections: str) -> str:
    return objective_yaml(name, objective, "[unsloth]", "cuda", baseline="unsloth", **sections)


KINDS = {
    "dpo": "{kind: dpo, loss_type: ipo, beta: 0.2}",
    "orpo": "{kind: orpo, beta: 0.3}",
    "kto": "{kind: kto, beta: 0.15, desirable_weight: 1.5}",
    "grpo": "{kind: grpo, num_generations: 2, max_new_tokens: 4, beta: 0.04}",
}


def _sc(kind: str, objective: str | None = None, method: str = "{kind: lora, lora_r: 8, lora_alpha: 16}"):
    data = PROMPTS_DATA if kind == "grpo" else None
    text = scenario(f"t_{kind}", objective or KINDS[kind], method=method,
                    **({"data": data} if data else {}))
    return parse_scenario(text, "t.yaml")


# -- what the adapter declares ---------------------------------------------------------------------------------------


def test_declares_every_objective_of_unsloths_guides():
    info = registry.info("unsloth")
    assert info.objectives == {"sft", "dpo", "orpo", "kto", "grpo"}
    assert parse_scenario(scenario("t_kto", "{kind: kto}"), "t.yaml").objective.kind == "kto"  # not refused
    assert info.check_overrides({"objective_config": {"beta": 0.5}}) == []
    assert "did you mean 'objective_config'?" in dict(info.check_overrides({"objective_confg": {}}))[
        ("objective_confg",)]


def test_heavy_modules_import_no_hf_library():
    """``import unsloth`` must come first in the worker: the modules the adapter imports after it pull in nothing."""
    code = ("import sys, adapters_for_tools.unsloth.objectives, adapters_for_tools.unsloth.rl_config, "
            "adapters_for_tools.unsloth.trainers; "
            "print(sorted(m for m in ('transformers', 'trl', 'peft', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- Unsloth's own configuration (pure) ------------------------------------------------------------------------------


def test_each_objective_maps_one_to_one(tmp_path):
    dpo = rl_config.native_config(_sc("dpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert dpo["objective"] == "dpo" and dpo["data_file"] == str(tmp_path / "d.jsonl")
    args = dpo["dpo"]
    assert (args["beta"], args["loss_type"], args["precompute_ref_log_probs"]) == (0.2, ["ipo"], False)
    assert args["max_length"] == 48 and args["train_sampling_strategy"] == "sequential"
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], args["max_steps"]) == (2, 2, 3)
    # given, because Unsloth's patched configs default otherwise (adamw_8bit, weight decay 0.001, seed 3407, warmup)
    assert (args["optim"], args["weight_decay"], args["seed"], args["warmup_steps"]) == ("adamw_torch", 0.0, 42, 0)
    assert dpo["from_pretrained"]["model_name"] == "/ckpt" and dpo["from_pretrained"]["max_seq_length"] == 48
    assert dpo["get_peft_model"]["r"] == 8 and dpo["reference_copy"] is False and "model_init_kwargs" not in args
    orpo = rl_config.native_config(_sc("orpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")["orpo"]
    assert orpo["beta"] == 0.3 and "loss_type" not in orpo and "precompute_ref_log_probs" not in orpo
    kto_cfg = rl_config.native_config(_sc("kto"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    kto = kto_cfg["kto"]
    assert (kto["beta"], kto["loss_type"], kto["desirable_weight"], kto["undesirable_weight"]) == \
        (0.15, "kto", 1.5, 1.0)
    assert kto["precompute_ref_log_probs"] is False and kto["max_length"] == 48 and kto_cfg["reference_copy"] is False
    grpo_cfg = rl_config.native_config(_sc("grpo"), tmp_path, "/ckpt", tmp_path / "d.jsonl")
    grpo = grpo_cfg["grpo"]
    assert (grpo["num_generations"], grpo["max_completion_length"], grpo["temperature"], grpo["beta"]) == \
        (2, 4, 1.0, 0.04)
    assert grpo["loss_type"] == "grpo" and grpo["shuffle_dataset"] is False and "max_length" not in grpo
    # TRL's loss as TRL runs it, whatever Unsloth's GRPOConfig would resolve
    assert grpo["mask_truncated_completions"] is False and grpo["epsilon"] == grpo["epsilon_high"] == 0.2
    assert "scale_rewards" not in grpo
    assert grpo_cfg["reward_funcs"] == ["harness.inputs.preference.exact_match_reward"]
    dr = rl_config.native_config(_sc("grpo", "{kind: grpo, num_generations: 2, loss_type: dr_grpo}"), tmp_path,
                                 "/ckpt", tmp_path / "d.jsonl")["grpo"]
    assert dr["scale_rewards"] is None  # Unsloth's spelling of TRL's group scaling under dr_grpo
    json.dumps(grpo_cfg)  # saved as JSON


def test_reference_handling_in_the_config(tmp_path):
    def cfg(kind: str, objective: str, method: str = "{kind: lora, lora_r: 8, lora_alpha: 16}") -> dict:
        return rl_config.native_config(_sc(kind, objective, method), tmp_path, "/c", tmp_path / "d.jsonl")

    full = cfg("dpo", "{kind: dpo}", method="{kind: full}")  # auto -> a copy, loaded by TRL's trainer
    assert full["get_peft_model"] is None and full["from_pretrained"]["full_finetuning"] is True
    assert full["dpo"]["model_init_kwargs"] == {"dtype": "float32", "attn_implementation": "sdpa"}
    assert full["reference_copy"] is False
    assert cfg("dpo", "{kind: dpo, reference: copy}")["reference_copy"] is True  # beside LoRA: the adapter loads it
    assert cfg("kto", "{kind: kto, reference: copy}")["reference_copy"] is True
    assert cfg("kto", "{kind: kto}", method="{kind: full}")["kto"]["model_init_kwargs"]["dtype"] == "float32"
    pre = cfg("dpo", "{kind: dpo, reference: precomputed}", method="{kind: full}")["dpo"]
    assert pre["precompute_ref_log_probs"] is True and "model_init_kwargs" not in pre
    assert "model_init_kwargs" in cfg("grpo", "{kind: grpo, num_generations: 2, beta: 0.1}", "{kind: full}")["grpo"]
    assert "model_init_kwargs" not in cfg("grpo", "{kind: grpo, num_generations: 2}", "{kind: full}")["grpo"]
    grpo_copy = _sc("grpo", "{kind: grpo, num_generations: 2, beta: 0.1, reference: copy}")
    assert [s for s, _ in rl_config.cannot_honour(grpo_copy)] == ["objective.reference"]
    assert rl_config.cannot_honour(_sc("dpo")) == []


# -- the native config saved with the run ------------------------------------------------------------------------


def _ctx(tmp_path: Path, sc, overrides: dict) -> RunContext:
    rows = preference.build_rows(sc).rows
    data = tmp_path / "data.jsonl"
    write_jsonl(rows, data)
    work = tmp_path / "work"
    work.mkdir()
    info = registry.info("unsloth")
    return RunContext(scenario=sc, framework="unsloth", overrides=overrides, repeat=0, checkpoint="/ckpt",
                      dataset_path=data, work_dir=work, output_dir=work / "output", device="cuda", meter=None,
                      options=info.overrides.model_validate(overrides))


def test_the_native_config_is_saved_with_the_run(tmp_path):
    sc = _sc("dpo")
    ctx = _ctx(tmp_path, sc, {"objective_config": {"beta": 0.5}, "use_gradient_checkpointing": True})
    cfg = objectives.prepare(ctx)
    saved = Path(ctx.native_config)
    assert saved == ctx.work_dir / "unsloth_dpo.json" and json.loads(saved.read_text()) == cfg
    assert cfg["dpo"]["beta"] == 0.5  # the row's override over the scenario's
    assert cfg["from_pretrained"]["use_gradient_checkpointing"] is True
    assert ctx.extra["switches"] == {"unsloth_gradient_checkpointing": True}  # read back from the live model
    assert f"adapters_for_tools.unsloth.rerun {saved}" in ctx.extra["rerun"]
    rows = read_jsonl(cfg["data_file"])
    assert len(rows) == len(read_jsonl(ctx.dataset_path)) and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert ctx.unsupported == []


def test_an_sft_override_on_an_objective_row_is_refused(tmp_path):
    ctx = _ctx(tmp_path, _sc("orpo"), {"sft": {"packing": True}})
    with pytest.raises(ValueError, match="objective_config"):
        objectives.prepare(ctx)


@needs_trl
def test_the_configs_are_trls_own_fields(tmp_path):
    """Every key of each objective's config is a field of TRL's config class (Unsloth's patched configs add fields to
    TRL's and take TRL's): built with the trl environment's TRL, so a misspelt key fails here, not on the GPU."""
    script = f"""
import json, sys
from pathlib import Path
from harness.spec.scenario import parse_scenario
from adapters_for_tools.unsloth import rl_config
import trl
from trl.experimental.orpo import ORPOConfig
classes = {{"dpo": trl.DPOConfig, "orpo": ORPOConfig, "kto": trl.KTOConfig, "grpo": trl.GRPOConfig}}
for kind, text in json.loads(sys.argv[1]).items():
    cfg = rl_config.native_config(parse_scenario(text, "t.yaml"), Path({str(tmp_path)!r}), "/ckpt", Path("/d.jsonl"))
    args = classes[kind](**cfg[kind])
    print(kind, type(args).__name__, args.beta)
"""
    full = "{kind: full}"  # dpo and grpo then carry model_init_kwargs (TRL's trainer loads the reference copy)
    texts = {"dpo": scenario("t_dpo", "{kind: dpo, loss_type: hinge}", method=full),
             "orpo": scenario("t_orpo", KINDS["orpo"]),
             "kto": scenario("t_kto", KINDS["kto"], method=full),
             "grpo": scenario("t_grpo", KINDS["grpo"], method=full,
                              data=PROMPTS_DATA)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*envs.resolve("trl").pythonpath, str(REPO)]))
    out = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.split("\n") if ln}
    assert got == {"dpo": ["DPOConfig", "0.1"], "orpo": ["ORPOConfig", "0.3"], "kto": ["KTOConfig", "0.15"],
                   "grpo": ["GRPOConfig", "0.04"]}


# -- GRPO counted from the loss inputs -------------------------------------------------------------------------------


class _Policy(torch.nn.Module):
    """Stands for a causal LM: the hooks only read the arguments of its forwards."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=None, position_ids=None):  # noqa: ANN001, ANN201
        return input_ids.float().sum()


def _grpo_inputs() -> dict:
    pad = 0  # left-padded prompts, right-padded completions, as TRL's GRPOTrainer builds them
    prompt_ids = torch.tensor([[pad, 5, 6], [7, 8, 9], [pad, 5, 6], [7, 8, 9]])
    completion_ids = torch.tensor([[3, 4, pad, pad], [3, 3, 3, 3], [4, pad, pad, pad], [3, 4, 3, pad]])
    return {"prompt_ids": prompt_ids, "prompt_mask": (prompt_ids != pad).long(), "completion_ids": completion_ids,
            "completion_mask": (completion_ids != pad).long()}


def test_grpo_counted_from_the_loss_inputs_as_from_trls_forward():
    """Unsloth's GRPO trains on a packed row (and checks it with forwards of its own): counted from the inputs of
    compute_loss, the figures are those the policy hook takes from TRL's padded forward of the same micro-batch."""
    inputs = _grpo_inputs()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)

    trl_meter, policy = StepMeter(0), _Policy()
    ObjectiveMeter(trl_meter, "cpu").attach(SimpleNamespace(model=policy), "dpo")  # the policy hook alone
    trl_meter.step_begin()
    policy(input_ids=ids, attention_mask=mask, logits_to_keep=inputs["completion_ids"].shape[1])  # TRL's forward
    trl_meter.step_end(1.0)

    us_meter, packed_policy = StepMeter(0), _Policy()
    om = ObjectiveMeter(us_meter, "cpu")

    def compute_loss(model, batch, num_items_in_batch=None):  # noqa: ANN001, ANN202
        flat = ids[mask.bool()].unsqueeze(0)
        model(input_ids=flat, position_ids=torch.arange(flat.shape[1]).unsqueeze(0))  # one packed row
        with torch.no_grad():
            model(input_ids=flat[:, :5])  # a packing check of the tool's own
        return torch.tensor(1.0)

    trainer = SimpleNamespace(model=packed_policy, compute_loss=compute_loss, _generate_single_turn=None)
    om.attach(trainer, "grpo")
    om.count_loss_inputs(trainer)
    us_meter.step_begin()
    trainer.compute_loss(packed_policy, inputs)
    with torch.no_grad():
        packed_policy(input_ids=ids, attention_mask=mask)  # a reference pass, outside the loss
    us_meter.step_end(1.0)

    keys = ("tokens", "loss_tokens", "samples", "rows", "max_len", "micro_batches")
    assert {k: us_meter.steps[0][k] for k in keys} == {k: trl_meter.steps[0][k] for k in keys}
    assert us_meter.steps[0]["tokens"] == int(mask.sum()) and us_meter.steps[0]["loss_tokens"] == 2 + 4 + 1 + 3
    assert om.batch_effective("grpo") == {"micro_batch": 4} and us_meter.first_forward_training is True
    assert om.nograd_forwards == 1 and om.nograd_before == int(mask.sum())  # the reference pass alone


# -- on the GPU (the unsloth environment) ----------------------------------------------------------------------------


def _run(tmp_path, monkeypatch, text: str) -> dict:
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sweep = runner.run_sweep(parse_scenario(text, str(tmp_path / "t.yaml")), tmp_path / "results", new=True,
                             quiet=True)
    res = runner.load_result(sweep, "unsloth", 0)
    assert res["status"] == "ok", (res.get("reason"), (res.get("traceback") or "")[-3000:])
    return res


GPU_MODEL = "{preset: small-llama-30m, weights: random, dtype: bfloat16}"
GPU_TRAIN = "{micro_batch: 4, grad_accum: 1, steps: 4, warmup_steps: 1, lr: 1.0e-4, optimizer: adamw_torch_fused}"


@pytest.mark.gpu
@needs_unsloth
@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto", "grpo"])
def test_each_objective_through_unsloths_trainer(kind, tmp_path, monkeypatch):
    """bf16 LoRA on small-llama-30m, a few steps through the harness worker: Unsloth's patched trainer trains, the
    settings are read back from it, the reference is the base model (none for ORPO)."""
    data = (PROMPTS_DATA if kind == "grpo"
            else "{source: synthetic, seq_len: 256, lengths: fixed}")
    objective = "{kind: grpo, num_generations: 4, max_new_tokens: 8, beta: 0.04}" if kind == "grpo" else KINDS[kind]
    res = _run(tmp_path, monkeypatch, scenario(f"gpu_{kind}", objective, data=data, model=GPU_MODEL, train=GPU_TRAIN))
    # a random model's GRPO rewards are all 0, so its loss may not move: the grpo row is checked for what ran
    assert res["valid"] or (kind == "grpo" and all("loss never moved" in r for r in res["invalid_reasons"])), \
        res["invalid_reasons"]
    assert res["extra"]["trainer_class"].rsplit(".", 1)[1] == f"Unsloth{kind.upper()}Trainer"
    eff = res["effective"]
    assert (eff["objective"], eff["beta"]) == (kind, {"dpo": 0.2, "orpo": 0.3, "kto": 0.15, "grpo": 0.04}[kind])
    # the base model: TRL disables the adapters, or (DPO, GRPO with a KL term: TRL's way with a policy Unsloth wrapped
    # already) keeps a frozen copy of the untrained adapter, which is the base model too
    assert same_setting("reference", eff["reference"]) == {"dpo": "adapter_disabled", "orpo": "none",
                                                           "kto": "adapter_disabled",
                                                           "grpo": "adapter_disabled"}[kind], eff["reference"]
    assert eff["micro_batch"] == 4 and res["metrics"]["peak_vram_nvml_gib"]
    assert res["native_config"].endswith(f"unsloth_{kind}.json") and "unsloth.rerun" in res["extra"]["rerun"]
    assert (Path(res["native_config"]).parent / f"{kind}_config.json").exists()
    if kind == "dpo":
        assert eff["loss_type"] == "ipo"
        # the same token ids as every framework: <bos> + prompt + completion + <eos>, 256 per sequence
        assert [s["tokens"] for s in res["steps"]] == [2 * 4 * 256] * 4
        assert res["extra"]["reference_pass"]["tokens_per_step_mean"] == 2 * 4 * 256
    if kind == "orpo":
        assert [s["tokens"] for s in res["steps"]] == [2 * 4 * 256] * 4 and "reference_pass" not in res["extra"]
    if kind == "kto":  # 4 labelled completions per micro-batch; the reference and the KL estimate without gradient
        assert eff["desirable_weight"] == 1.5 and [s["tokens"] for s in res["steps"]] == [4 * 256] * 4
        assert res["extra"]["reference_pass"]["tokens_per_step_mean"] > 0
    if kind == "grpo":
        assert eff["loss_type"] == "grpo" and eff["num_generations"] == 4 and eff["max_new_tokens"] == 8
        assert all(s["rows"] == 4 and 4 <= s["loss_tokens"] <= 4 * 8 for s in res["steps"])
        assert res["extra"]["generation"]["generated_tokens_per_s"] > 0


@pytest.mark.gpu
@needs_unsloth
def test_dpo_full_fine_tuning_with_trls_reference_copy(tmp_path, monkeypatch):
    """Full fine-tuning compares with a frozen copy, which TRL's trainer (patched by Unsloth) loads itself."""
    res = _run(tmp_path, monkeypatch, scenario("gpu_dpo_full", "{kind: dpo}", method="{kind: full}",
                                               data="{source: synthetic, seq_len: 128, lengths: fixed}",
                                               model=GPU_MODEL, train=GPU_TRAIN))
    assert res["valid"], res["invalid_reasons"]
    assert res["effective"]["reference"] == "copy" and res["extra"]["reference_pass"]["tokens_per_step_mean"] > 0


@pytest.mark.gpu
@needs_unsloth
def test_grpo_full_from_a_warm_start_rewards_and_times_generation(tmp_path, monkeypatch):
    """grpo_small's path on a small scale: full fine-tuning without a KL term from a warm-started model (it answers
    some prompts right, most wrong), rewards, generation timed apart, completions counted."""
    warm = f"{{data: {TASKS / 'tb_train_last.jsonl'}, steps: 40, micro_batch: 16, lr: 3.0e-3, seq_len: 96}}"
    res = _run(tmp_path, monkeypatch, scenario(
        "gpu_grpo_full", "{kind: grpo, num_generations: 4, max_new_tokens: 3}", method="{kind: full}",
        model=f"{{preset: quality-tiny, weights: random, dtype: bfloat16, warm_start: {warm}}}",
        data=f"{{source: jsonl, path: {TASKS / 'tb_train_last.jsonl'}, seq_len: 96}}",
        train="{micro_batch: 16, grad_accum: 1, steps: 4, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: false}"))
    assert res["valid"], res["invalid_reasons"]
    eff = res["effective"]
    assert (eff["num_generations"], eff["max_new_tokens"], eff["reward"], eff["reference"]) == \
        (4, 3, "exact_match", "none")
    assert max(p["reward"] for p in res["extra"]["reward_curve"]) > 0
    gen = res["extra"]["generation"]
    assert all(g["completions"] == 16 and 16 <= g["generated_tokens"] <= 48 for g in gen["per_step"])
    assert 0 < gen["generation_fraction"] < 1
    assert all(s["rows"] == 16 and s["loss_tokens"] <= 16 * 3 for s in res["steps"])


@pytest.mark.gpu
@needs_unsloth
def test_shipped_scenarios_build_unsloths_configs(tmp_path):
    """The 8B DPO / ORPO and grpo_small rows: Unsloth's patched configs take each generated config (bf16 needs a
    GPU)."""
    script = f"""
import unsloth
import sys
from pathlib import Path
from harness.spec.scenario import load_scenario
from adapters_for_tools.unsloth import rl_config, trainers
for path in sys.argv[1:]:
    sc = load_scenario(path)
    cfg = rl_config.native_config(sc, Path({str(tmp_path)!r}), "/ckpt", Path("/d.jsonl"))
    _, config_cls = trainers.trainer_classes(sc.objective.kind)
    args = config_cls(**cfg[sc.objective.kind])
    print(sc.objective.kind, type(args).__name__, args.beta, args.per_device_train_batch_size)
"""
    names = ("llama8b_dpo", "llama8b_orpo", "llama8b_kto", "grpo_small")
    paths = [str(REPO / "scenarios" / f"{n}.yaml") for n in names]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*envs.resolve("unsloth").pythonpath, str(REPO)]),
               **envs.resolve("unsloth").env_vars)
    out = subprocess.run([sys.executable, "-c", script, *paths], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln.split() for ln in out.stdout.split("\n") if ln.split()[:1] in (["dpo"], ["orpo"], ["kto"], ["grpo"])]
    assert [(k, cls.startswith("Unsloth"), int(b)) for k, cls, _, b in lines] == [
        ("dpo", True, 2), ("orpo", True, 2), ("kto", True, 4), ("grpo", True, 32)]
    assert all(load_scenario(p) for p in paths)
