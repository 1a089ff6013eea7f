"""The report's objective section: the training batches' reward statistics judged against the baseline's (DPO and
ORPO by their accuracy, KTO by its margin, GRPO by its mean reward, within sampling noise with one baseline run)."""

from __future__ import annotations

import pytest
from fixtures_results import make_run, make_sweep, scenario_dict

from harness.reporting.objective import sampling_tolerance, training_rows
from harness.storing.sweep import load_sweep


def test_the_batch_reward_accuracy_is_judged_against_the_baselines_range_over_its_seeds(tmp_path):
    def run(fw: str, repeat: int, last: float) -> dict:
        r = make_run(fw, repeat)
        r["extra"] = {"train_rewards": [{"step": i + 1, "accuracy": 0.5 if i < 10 else last} for i in range(20)],
                      "reference_pass": {"tokens_per_step_mean": 4096.0}}
        return r

    runs = [run("trl", 0, 0.4), run("trl", 1, 0.6), run("trl", 2, 0.7),
            run("tunebench", 0, 0.5), run("tunebench", 1, 0.55), run("tunebench", 2, 0.9),
            run("axolotl", 0, 0.9), run("axolotl", 1, 0.95), run("axolotl", 2, 0.8)]
    sc = scenario_dict(frameworks=["trl", "tunebench", "axolotl"], device="cuda", repeats=3)
    sc["objective"] = {"kind": "dpo", "beta": 0.1}
    sc["measure"]["baseline"] = "trl"
    sweep = load_sweep(make_sweep(tmp_path / "results" / "dpo-20260101-000000", runs, scenario=sc))
    rows = {r[0]: r for r in training_rows(sweep, "dpo")}
    assert rows["trl"][2:4] == ["0.600 (0.400–0.700)", "baseline"]
    assert rows["tunebench"][2:4] == ["0.550 (0.500–0.900)", "yes"]  # its median lies within trl's seeds
    assert rows["axolotl"][3].text == "no" and rows["axolotl"][1] == "0.500 (0.500–0.500)"
    one = load_sweep(make_sweep(tmp_path / "results" / "one-20260101-000000", [run("trl", 0, 0.4),
                                                                              run("tunebench", 0, 0.9)],
                                scenario=sc | {"measure": {**sc["measure"], "repeats": 1}}))
    assert [r[3] for r in training_rows(one, "dpo")] == ["—", "—"]  # one baseline run: no range to judge by


def test_grpo_rewards_with_one_baseline_run_are_judged_within_sampling_noise(tmp_path):
    def run(fw: str, last: float) -> dict:
        r = make_run(fw, 0)
        r["extra"] = {"reward_curve": [{"step": i + 1, "reward": 0.0 if i < 10 else last} for i in range(20)],
                      "generation": {"per_step": [{"step": i + 1, "completions": 32} for i in range(20)]}}
        return r

    sc = scenario_dict(frameworks=["trl", "unsloth", "slow"], device="cuda", repeats=1)
    sc["objective"] = {"kind": "grpo", "beta": 0.0}
    sc["measure"]["baseline"] = "trl"
    sweep = load_sweep(make_sweep(tmp_path / "results" / "grpo-20260101-000000",
                                  [run("trl", 0.30), run("unsloth", 0.33), run("slow", 0.0)], scenario=sc))
    rows = {r[0]: r for r in training_rows(sweep, "grpo")}
    tol = sampling_tolerance(0.315, 320)  # 10 steps of 32 completions each
    assert tol == pytest.approx(3 * (2 * 0.315 * 0.685 / 320) ** 0.5) and 0.03 < tol < 0.2
    assert rows["trl"][3] == "—" and rows["unsloth"][3] == f"yes (±{tol:.3f})"
    assert rows["slow"][3].text.startswith("no") and rows["slow"][3].mark == "bad"  # rewards that never rose
    assert sampling_tolerance(0.0, 320) == 0.0  # nothing rewarded on either side: only equal windows are alike


def test_kto_batches_are_judged_by_their_reward_margin(tmp_path):
    def run(fw: str, repeat: int, last: float) -> dict:
        r = make_run(fw, repeat)
        r["extra"] = {"train_rewards": [{"step": i + 1, "margin": 0.0 if i < 10 else last, "chosen": 0.0,
                                         "rejected": 0.0} for i in range(20)]}
        return r

    sc = scenario_dict(frameworks=["trl", "axolotl"], device="cuda", repeats=2)
    sc["objective"] = {"kind": "kto", "beta": 0.1}
    sc["measure"]["baseline"] = "trl"
    sweep = load_sweep(make_sweep(tmp_path / "results" / "kto-20260101-000000",
                                  [run("trl", 0, 0.04), run("trl", 1, 0.06), run("axolotl", 0, 0.05),
                                   run("axolotl", 1, 0.05)], scenario=sc))
    rows = {r[0]: r for r in training_rows(sweep, "kto")}  # KTO logs no accuracy: its margin is what is judged
    assert rows["trl"][1:4] == ["0.000 (0.000–0.000)", "0.050 (0.040–0.060)", "baseline"]
    assert rows["axolotl"][2:4] == ["0.050 (0.050–0.050)", "yes"]
