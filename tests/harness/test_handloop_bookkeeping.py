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
