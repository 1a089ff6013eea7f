"""scenarios/quality_dpo_small.yaml end to end on the CPU: DPO makes the model prefer the right answer.

The shipped scenario, as a user runs it: the tiny model warm-started by 40 SFT steps, TRL's DPOTrainer trains it on
last-letter pairs, then the
saved model is scored on the held-out pairs (reward accuracy, from the saved files: harness/analysis/reward.py)
and by lm-eval on the held-out task, both next to the untrained model. Needs the trl environment (skipped
otherwise). Measured on 2 CPU cores (45 s): reward and likelihood accuracy 1.00 against the untrained model's
likelihood accuracy 0.49; lm-eval multiple choice 1.00 against 0.21 (chance 0.25).

scenarios/quality_dpo_lora_small.yaml the same way with LoRA, TRL beside tunebench: what tunebench's DPO trained
scores as TRL's does (2.5 minutes on 2 cores); scenarios/quality_kto_lora_small.yaml the same for KTO (2 minutes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.running import envs
from harness.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]


needs_trl = pytest.mark.skipif(not envs.resolve("trl").ready,
                               reason="trl environment not created: run `python -m harness env create trl`")


def _sweep(tmp_path, monkeypatch, name: str, frameworks: tuple[str, ...]) -> tuple[Path, dict[str, dict]]:
    """The shipped scenario ``name`` run as a user runs it; each framework's stored result, checked: ok, valid, and
    the objective's gain on the held-out pairs and in lm-eval over the untrained (warm-started) model."""
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sweep = runner.run_sweep(load_scenario(REPO / "scenarios" / f"{name}.yaml"), tmp_path / "results", new=True,
                             quiet=True)
    res = {fw: runner.load_result(sweep, fw, 0) for fw in frameworks}
    for fw, r in res.items():
        assert r["status"] == "ok" and r["valid"], (fw, r.get("reason"), r["invalid_reasons"])
        rw = r["reward_eval"]
        assert rw["status"] == "ok" and rw["pairs"] == 100, (fw, rw)
        assert rw["reward_accuracy"] >= 0.9, (fw, rw)  # chance: 0.5; the untrained model's rewards are all 0
        assert rw["likelihood_accuracy"] >= rw["baseline_likelihood_accuracy"] + 0.3, (fw, rw)
        assert rw["reward_margin"] > 0, (fw, rw)
        ev = r["eval"]
        assert ev["status"] == "ok", (fw, ev.get("error"))
        # lm-eval, 100 held-out documents: better than the untrained model and than chance (0.25)
        assert ev["metrics"]["tb_last_mc/acc"] >= max(0.8, ev["baseline_metrics"]["tb_last_mc/acc"] + 0.3), (fw, ev)
    return sweep, res


@pytest.mark.slow
@needs_trl
def test_dpo_gains_reward_and_lm_eval_accuracy(tmp_path, monkeypatch):
    _sweep(tmp_path, monkeypatch, "quality_dpo_small", ("trl",))


@pytest.mark.slow
@needs_trl
@pytest.mark.parametrize("name", ["quality_dpo_lora_small", "quality_kto_lora_small"])
def test_tunebench_trains_what_trls_does(tmp_path, monkeypatch, name):  # noqa: ANN001
    from harness.analysis import parity
    from harness.storing.sweep import load_sweep

    sweep, res = _sweep(tmp_path, monkeypatch, name, ("trl", "tunebench"))
    ours, trl = res["tunebench"]["reward_eval"], res["trl"]["reward_eval"]
    assert abs(ours["reward_accuracy"] - trl["reward_accuracy"]) <= 0.05, (ours, trl)
    assert ours["reward_margin"] == pytest.approx(trl["reward_margin"], rel=0.05), (ours, trl)
    table = parity.parity_table(load_sweep(sweep).runs, "trl")
    assert table.set_index("framework").loc["tunebench", "parity_status"] == "ok", table
    # the forwards without gradient (the reference pass; KTO's KL estimate) counted alike by the two meters
    ref = {fw: r["extra"]["reference_pass"]["tokens_per_step_mean"] for fw, r in res.items()}
    assert ref["tunebench"] == pytest.approx(ref["trl"]), ref
