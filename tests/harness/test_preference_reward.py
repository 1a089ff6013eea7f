"""Reward accuracy of a saved output on held-out pairs (harness/analysis/reward.py), the warm start
(harness/inputs/warmstart.py), and the sweep's preparation of an objective's rows (harness/running/prepare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.analysis import reward
from harness.inputs import models
from harness.running.prepare import prepare
from harness.spec.scenario import parse_scenario

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"


def _scenario(objective: str, data: str, model_extra: str = "") -> str:
    return (f"version: 1\nname: t\nmodel: {{preset: quality-tiny, dtype: float32{model_extra}}}\n"
            f"method: {{kind: full}}\nobjective: {objective}\ndata: {data}\n"
            "train: {micro_batch: 2, steps: 3, warmup_steps: 1}\n"
            "hardware: {device: cpu}\nframeworks: [trl]\nmeasure: {baseline: trl}\n")


def test_score_counts_strict_wins_and_averages_margins():
    got = reward.score(chosen=[-1.0, -2.0, -3.0], rejected=[-2.0, -2.0, -1.0], ref_chosen=[-1.5, -2.0, -3.0],
                       ref_rejected=[-1.5, -2.0, -3.0], beta=0.5)
    # margins: 0.5 * ((c - rc) - (r - rr)) = 0.5, 0.0, -1.0
    assert got["reward_accuracy"] == pytest.approx(1 / 3) and got["reward_margin"] == pytest.approx(-0.5 / 3)
    assert got["likelihood_accuracy"] == pytest.approx(1 / 3) and got["baseline_likelihood_accuracy"] == 0.0
    assert got["pairs"] == 3


def test_token_ids_split_where_trl_splits():
    tok = models.build_tokenizer(320)
    ids, start = reward.token_ids(tok, "ab", "c")
    assert ids == [tok.bos_token_id, ord("a"), ord("b"), ord("c"), tok.eos_token_id] and start == 3


@pytest.mark.slow
def test_untrained_output_has_no_reward_and_its_baselines_likelihood(env):
    ckpt = models.prepare_random_checkpoint(models.get_preset("quality-tiny"), "float32", 0)
    sc = parse_scenario(_scenario(f"{{kind: dpo, beta: 0.5, eval_pairs: {TASKS / 'tb_pref_eval_last.jsonl'}}}",
                                  f"{{source: jsonl, path: {TASKS / 'tb_pref_last.jsonl'}, seq_len: 96}}"), "s.yaml")
    spec = {"scenario": sc.to_dict(), "scenario_source": "s.yaml", "checkpoint": str(ckpt),
            "output_dir": str(ckpt), "work_dir": str(env)}  # the starting model saved as the "trained" one
    (env / "spec.json").write_text(json.dumps(spec))
    assert reward.main([str(env / "spec.json")]) == 0
    got = json.loads((env / "reward_result.json").read_text())
    assert got["status"] == "ok" and got["pairs"] == 100 and got["beta"] == 0.5
    assert got["reward_accuracy"] == 0.0 and got["reward_margin"] == 0.0  # every reward is 0: pi == pi_ref
    assert got["likelihood_accuracy"] == got["baseline_likelihood_accuracy"]
    assert 0.3 < got["likelihood_accuracy"] < 0.8  # a random model: about chance


def test_a_failed_scoring_is_a_result(env):
    (env / "spec.json").write_text(json.dumps({"scenario": {}, "work_dir": str(env)}))
    assert reward.main([str(env / "spec.json")]) == 1
    assert json.loads((env / "reward_result.json").read_text())["status"] == "error"


def test_prepare_writes_the_objectives_rows(env):
    sc = parse_scenario(_scenario("{kind: kto}", f"{{source: jsonl, path: {TASKS / 'tb_pref_last.jsonl'}, "
                                                 "seq_len: 96}"), "s.yaml")
    out = prepare(sc, env / "data")
    rows = [json.loads(line) for line in Path(out["dataset_path"]).read_text().splitlines()]
    meta = json.loads((env / "data" / "dataset.meta.json").read_text())
    assert meta["format"] == "labelled" and len(rows) == 2 * 4800 and set(rows[0]) == {"prompt", "completion", "label"}


@pytest.mark.slow
def test_warm_start_trains_once_and_every_run_loads_it(env):
    import torch
    from safetensors.torch import load_file

    ws = (", warm_start: {data: " + str(TASKS / "tb_train_last.jsonl") + ", steps: 20, micro_batch: 8, lr: 3.0e-3, "
          "seq_len: 96}")
    sc = parse_scenario(_scenario("{kind: dpo}", f"{{source: jsonl, path: {TASKS / 'tb_pref_last.jsonl'}, "
                                                 "seq_len: 96}", ws), "s.yaml")
    assert sc.to_dict()["model"]["warm_start"]["steps"] == 20
    first = Path(prepare(sc, env / "a")["checkpoint"])
    random_ckpt = models.prepare_random_checkpoint(models.get_preset("quality-tiny"), "float32", 0)
    assert first != random_ckpt and first.parent == random_ckpt.parent
    meta = json.loads((first / "warm_start.json").read_text())
    assert meta["steps"] == 20 and meta["final_loss"] < 5.0
    warm, cold = load_file(first / "model.safetensors"), load_file(random_ckpt / "model.safetensors")
    assert set(warm) == set(cold) and any(not torch.equal(warm[k], cold[k]) for k in warm)
    assert (first / "tokenizer.json").exists()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(prepare(sc, env / "b")["checkpoint"]) == first  # built once: the second sweep reuses it
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_warm_start_data_is_checked(tmp_path):
    from harness.spec.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="model.warm_start.data: file 'missing.jsonl' not found"):
        parse_scenario(_scenario("{kind: dpo}", f"{{source: jsonl, path: {TASKS / 'tb_pref_last.jsonl'}, "
                                                "seq_len: 96}", ", warm_start: {data: missing.jsonl, steps: 5}"),
                       "s.yaml")
