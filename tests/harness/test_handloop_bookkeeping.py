"""The hf hand loop times the HF Trainer's bookkeeping inside each step as the Trainer runs it (CPU, tiny-llama)."""

from __future__ import annotations

import pytest
import torch

from harness.measuring.handloop.__main__ import run_loop
from harness.measuring.handloop.knobs import HfKnobs


def test_the_hf_loop_runs_the_trainers_bookkeeping_and_each_part_can_be_left_out(tiny, monkeypatch):
    """The HF Trainer's host work in each step, which the GPU waits for after the NaN/Inf check's sync, is part of
    what the loop times by default (the harness's hf row pays it); each knob leaves one part out."""
    from harness.measuring.handloop import trainer_loop

    calls = {"flos": 0, "isnan": 0}
    stock = trainer_loop.stock_flos

    def counting_flos(model):  # noqa: ANN001, ANN202
        inner = stock(model)

        def flos(inputs):  # noqa: ANN001, ANN202
            calls["flos"] += 1
            return inner(inputs)
        return flos

    real_isnan = torch.isnan

    def counting_isnan(x):  # noqa: ANN001, ANN202
        calls["isnan"] += 1
        return real_isnan(x)

    monkeypatch.setattr(trainer_loop, "stock_flos", counting_flos)
    monkeypatch.setattr(trainer_loop.torch, "isnan", counting_isnan)
    sc = tiny[1]
    res = run_loop("hf", sc, steps=2)
    assert res["status"] == "ok", res.get("traceback")
    per_step = sc.train.grad_accum
    assert calls == {"flos": 2 * per_step, "isnan": 2 * per_step}  # once per micro-batch, as the Trainer
    assert res["settings"]["logging_nan_inf_filter"] is True
    assert HfKnobs().nan_inf_filter and HfKnobs().count_flos and HfKnobs().train_each_step
    calls.update(flos=0, isnan=0)
    off = run_loop("hf", sc, steps=2, knob_pairs=["nan_inf_filter=false", "count_flos=false"])
    assert off["status"] == "ok", off.get("traceback")
    assert calls == {"flos": 0, "isnan": 0} and off["settings"]["logging_nan_inf_filter"] is False
    assert off["losses"] == pytest.approx(res["losses"], abs=1e-6)  # bookkeeping only: the same training


def test_the_trainer_knob_trains_the_loops_model_with_transformers_trainer(tiny):
    """``trainer=true``: the same model, rows and settings through ``transformers.Trainer`` with no harness around
    it; the same tokens are counted and (float32, the same rows in the same order) the same losses come out."""
    sc = tiny[1]
    plain = run_loop("hf", sc, steps=2)
    res = run_loop("hf", sc, steps=2, knob_pairs=["trainer=true"])
    assert res["status"] == "ok", res.get("traceback")
    s = res["settings"]
    assert s["trainer"] == "transformers.Trainer" and s["hand_loop_knobs"]["trainer"] is True
    assert s["checkpoint_function"] == "torch.utils.checkpoint.checkpoint(use_reentrant=False)"
    assert res["steps"] == 2 and res["tokens_measured"] == plain["tokens_measured"]
    assert res["losses"] == pytest.approx(plain["losses"], abs=1e-4)


def _check(created: str, knobs: list[str], loop_tps: float, harness_tps: float | None = None) -> dict:
    check = {"created": created, "knobs": knobs, "loops": {"hf": {"status": "ok", "tokens_per_s": loop_tps,
                                                                  "step_s_median": 4096 / loop_tps}}}
    if harness_tps is not None:
        check["side_by_side"] = {"hf": {"status": "compared", "harness_tokens_per_s": harness_tps,
                                        "harness_step_s_median": 4096 / harness_tps}}
    return check


def test_loop_variants_are_compared_within_one_lease_only():
    from harness.analysis.handloop import loop_variants

    checks = [("selfcheck.json", _check("2026-12-03T01:00:00+00:00", [], 9000.0)),  # another lease, alone
              ("selfcheck-2.json", _check("2026-12-03T06:10:00+00:00", ["trainer=true"], 7377.0)),
              ("selfcheck-3.json", _check("2026-12-03T06:11:00+00:00", ["nan_inf_filter=false"], 7921.0)),
              ("selfcheck-4.json", _check("2026-12-03T06:13:00+00:00", [], 7296.0, harness_tps=7392.0)),
              ("selfcheck-5.json", _check("2026-12-03T09:00:00+00:00", ["count_flos=false"], 8000.0))]  # no default
    rows = loop_variants(checks)
    assert {r["group"] for r in rows} == {"selfcheck-2.json, selfcheck-3.json, selfcheck-4.json"}
    got = {r["variant"]: round(r["vs_defaults_pct"], 1) for r in rows}
    assert got == {"trainer=true": 1.1, "nan_inf_filter=false": 8.6, "defaults": 0.0, "harness (side by side)": 1.3}
    # without a variant a group is no bisection: nothing to show
    assert loop_variants([checks[0], checks[3]]) == []
