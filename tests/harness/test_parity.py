"""Loss parity: matching curves pass, a planted divergence is flagged (unit and through the runner)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.analysis import parity, runs_table
from harness.storing.schema import RunResult
from harness.storing.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
QUALITY_SMALL = REPO / "scenarios" / "quality_small.yaml"


def _run(fw: str, losses: list[float | None], repeat: int = 0, status: str = "ok", dtype: str = "float32") -> RunResult:
    return RunResult(scenario="parity", framework=fw, repeat=repeat, status=status, expected={"dtype": dtype},
                     steps=[{"step": i + 1, "loss": x} for i, x in enumerate(losses)])


BASE = [2.0, 1.5, 1.2, 1.0]


def test_table_columns_and_verdicts():
    runs = [_run("hf", BASE), _run("ours", [x + 0.001 for x in BASE]), _run("bad", [x * 1.5 for x in BASE]),
            _run("crashed", [], status="error")]
    df = parity.parity_table(runs, "hf")
    assert list(df.columns) == ["framework", "repeat", "max_abs_diff", "mean_abs_diff", "tolerance",
                                "first_departure_step", "parity_status", "parity_ok"]
    got = {r.framework: r for r in df.itertuples()}
    assert got["hf"].parity_ok is True and got["hf"].max_abs_diff == 0
    assert got["ours"].parity_ok is True and got["ours"].max_abs_diff == pytest.approx(0.001)
    assert got["bad"].parity_ok is False and got["bad"].max_abs_diff == pytest.approx(1.0)
    assert got["bad"].parity_status == "departs" and got["bad"].first_departure_step == 1
    assert got["ours"].parity_status == "ok" and got["ours"].first_departure_step is pd.NA
    assert got["bad"].mean_abs_diff == pytest.approx(sum(BASE) / len(BASE) * 0.5)
    assert got["crashed"].parity_ok is None
    # float32 default: 0.01 + 0.01 * mean baseline loss
    assert got["ours"].tolerance == pytest.approx(0.01 + 0.01 * sum(BASE) / 4)


def test_grpo_without_a_kl_term_is_not_compared():
    """Its loss is zero at every step for any tool: 'ok' there would be a check that cannot fail."""
    def grpo(fw: str, losses: list[float], beta: float) -> RunResult:
        return RunResult(scenario="g", framework=fw, repeat=0, status="ok",
                         expected={"dtype": "bfloat16", "objective": "grpo", "beta": beta},
                         steps=[{"step": i + 1, "loss": x} for i, x in enumerate(losses)])

    flat = [0.0, -3.7e-09, 0.0, 0.0]
    got = {r.framework: r for r in parity.parity_table([grpo("trl", flat, 0.0), grpo("us", flat, 0.0)], "trl")
           .itertuples()}
    assert got["us"].parity_status == got["trl"].parity_status == "not applicable" and got["us"].parity_ok is None
    with_kl = parity.parity_table([grpo("trl", BASE, 0.04), grpo("us", [x * 1.5 for x in BASE], 0.04)], "trl")
    assert with_kl.set_index("framework").parity_status.to_dict() == {"trl": "ok", "us": "departs"}


def test_tolerance_by_dtype_and_override():
    assert parity.tolerance_for(_run("x", BASE, dtype="bfloat16")) == (0.05, 0.05)
    assert parity.tolerance_for(_run("x", BASE)) == (0.01, 0.01)
    assert parity.tolerance_for(_run("x", BASE), atol=0.0, rtol=0.5) == (0.0, 0.5)
    drift = [x + 0.03 for x in BASE]  # bf16-sized drift: fine in bf16, flagged in float32
    assert parity.parity_table([_run("hf", BASE, dtype="bfloat16"), _run("o", drift, dtype="bfloat16")],
                               "hf").parity_ok.tolist() == [True, True]
    assert parity.parity_table([_run("hf", BASE), _run("o", drift)], "hf").parity_ok.tolist() == [True, False]


def test_repeats_pair_with_the_same_baseline_repeat_else_repeat0():
    runs = [_run("hf", BASE, 0), _run("hf", [x + 0.5 for x in BASE], 1), _run("o", [x + 0.5 for x in BASE], 1),
            _run("o", BASE, 2)]
    cols = parity.parity_columns(runs, "hf")
    assert cols[("o", 1)]["parity_ok"] is True  # against hf r1
    assert cols[("o", 2)]["parity_ok"] is True  # no hf r2: against hf r0
    assert cols[("hf", 1)]["parity_ok"] is False  # the baseline's repeats against its r0: determinism
    assert set(cols[("o", 1)]) == {"parity_ok", "parity_status", "parity_max_abs_diff"}


def _decay(n: int) -> list[float]:
    return [2.0 * 0.97**i + 0.1 for i in range(n)]


def test_transient_excursion_versus_departure():
    """A spike in one curve that settles again is 'transient' (ok, warned); not settling or early is 'departs'."""
    base = _decay(100)
    spike = [x + (0.3 if 60 <= i < 66 else 0.0) for i, x in enumerate(base)]
    late = [x + (0.3 if i >= 60 else 0.0) for i, x in enumerate(base)]  # never comes back
    early = [x + (0.3 if 10 <= i < 16 else 0.0) for i, x in enumerate(base)]  # parts in the first quarter
    short = spike[:]  # too few steps for the windows to mean anything
    df = parity.parity_table([_run("hf", base), _run("spike", spike), _run("late", late), _run("early", early)],
                             "hf")
    got = {r.framework: r for r in df.itertuples()}
    assert got["spike"].parity_status == "transient" and got["spike"].parity_ok is True
    assert got["spike"].first_departure_step == 61 and got["spike"].max_abs_diff == pytest.approx(0.3)
    assert got["late"].parity_status == "departs" and got["late"].parity_ok is False
    assert got["early"].parity_status == "departs" and got["early"].first_departure_step == 11
    c = parity.compare_curves(parity.loss_curve(_run("s", short[:19])), parity.loss_curve(_run("hf", base[:19])),
                              0.01, 0.01)
    assert c["parity_status"] == "ok"  # the spike is after step 19
    spike19 = [x + (0.3 if 12 <= i < 14 else 0.0) for i, x in enumerate(base[:19])]
    c = parity.compare_curves(parity.loss_curve(_run("s", spike19)), parity.loss_curve(_run("hf", base[:19])),
                              0.01, 0.01)
    assert c["parity_status"] == "departs"  # under 20 steps there is no transient


def test_missing_losses_and_no_common_steps():
    a = _run("hf", BASE)
    b = _run("o", [None, None, 1.2, 1.0])
    c = parity.compare_curves(parity.loss_curve(b), parity.loss_curve(a), 0.01, 0.01)
    assert c["steps"] == 2 and c["parity_ok"] is True
    assert parity.compare_curves({}, parity.loss_curve(a), 0.01, 0.01)["parity_ok"] is None


def test_nan_or_inf_loss_is_a_departure_at_its_step():
    """A run trained at lr .inf: finite first loss, then NaN. Dropping the NaN steps read "ok, max diff 0"."""
    nan, inf = float("nan"), float("inf")
    base = _decay(30)
    runs = [_run("hf", base), _run("lr-inf", base[:1] + [nan] * 29, status="diverged"),
            _run("spike-inf", base[:25] + [inf] + base[26:]), _run("crashed", base, status="error")]
    got = {r.framework: r for r in parity.parity_table(runs, "hf").itertuples()}
    assert got["lr-inf"].parity_status == "departs" and got["lr-inf"].parity_ok is False
    assert got["lr-inf"].first_departure_step == 2 and got["lr-inf"].max_abs_diff == inf
    # one infinite loss late in a long run is not a "transient": it departs at that step
    assert got["spike-inf"].parity_status == "departs" and got["spike-inf"].first_departure_step == 26
    assert got["crashed"].parity_ok is None  # a failed run has no curve
    # NaN in the baseline's curve is a departure too, for every run compared with it (itself included)
    bad_base = [_run("hf", base[:5] + [nan] * 25), _run("o", base)]
    assert parity.parity_table(bad_base, "hf").parity_status.tolist() == ["departs", "departs"]
    c = parity.compare_curves({1: 2.0, 2: nan}, {1: 2.0, 2: nan}, 0.01, 0.01)
    assert c["parity_status"] == "departs" and c["first_departure_step"] == 2


@pytest.mark.slow
def test_runner_sweep_flags_the_planted_divergence(tmp_path, monkeypatch):
    """hf, dummy and dummy with loss_scale 1.5, same weights and data: only the planted run is flagged."""
    from harness.running.runner import run_sweep
    from harness.spec.scenario import scenario_from_dict

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    d = yaml.safe_load(QUALITY_SMALL.read_text())
    d["name"] = "parity_small"
    d["train"]["steps"] = 16  # the curves part at the first step already; no evaluation needed
    d["eval"] = {}
    d["frameworks"] = ["hf", "dummy", {"name": "dummy", "label": "dummy-diverged", "overrides": {"loss_scale": 1.5}}]
    sc = scenario_from_dict(d, str(QUALITY_SMALL))  # the data path resolves against the scenario file
    sweep = run_sweep(sc, tmp_path / "results", quiet=True)
    df = runs_table.runs_frame(load_sweep(sweep))
    ok = dict(zip(df["framework"], df["parity_ok"], strict=True))
    assert ok == {"hf": True, "dummy": True, "dummy-diverged": False}, df.to_string()
    diff = dict(zip(df["framework"], df["parity_max_abs_diff"], strict=True))
    assert diff["dummy"] < 1e-3  # fp32 Trainer vs plain loop: summation order only
    assert diff["dummy-diverged"] > 1.0  # 0.5 x a first-step loss of ~5.8


def _chaotic(n: int, seed: int, amp: float = 0.15) -> list[float]:
    """A decaying loss with a seed's own wiggle after step 30 (how bf16 runs from random weights part)."""
    import random

    rng = random.Random(seed)
    return [2.0 * 0.99**i + (amp * rng.uniform(-1, 1) if i > 30 else 0.0) for i in range(n)]


def _seeded(fw: str, losses: list[float], repeat: int) -> RunResult:
    r = _run(fw, losses, repeat=repeat, dtype="bfloat16")
    r.seeds = {"train": 42 + repeat, "model": repeat}
    return r


def test_seed_spread_tells_chaos_from_a_bug():
    n = 300
    hf = [_seeded("hf", _chaotic(n, s), s) for s in range(3)]
    ours = [_seeded("ours", _chaotic(n, 10 + s), s) for s in range(3)]  # another implementation: its own chaos
    bug = [_seeded("bug", [x * 1.5 for x in _chaotic(n, 20 + s)], s) for s in range(3)]  # a planted loss scale
    got = {(r.framework, r.repeat): r for r in parity.parity_table(hf + ours + bug, "hf").itertuples()}
    for s in range(3):
        assert got[("ours", s)].parity_status == "seed-spread" and got[("ours", s)].parity_ok is True
        assert got[("bug", s)].parity_status == "departs" and got[("bug", s)].parity_ok is False
    # one seed (the repeats measured run-to-run noise, not chaos): no band, the chaotic run departs
    one_seed = [_run("hf", _chaotic(n, 0), dtype="bfloat16"), _run("ours", _chaotic(n, 10), dtype="bfloat16")]
    assert parity.seed_band(one_seed[:1]) is None
    assert parity.parity_table(one_seed, "hf").set_index("framework").loc["ours", "parity_status"] == "departs"


def test_seed_band_and_window():
    a, b, c = _seeded("hf", [1.0, 2.0, 3.0], 0), _seeded("hf", [1.5, 2.0, 2.0], 1), _seeded("hf", [1.0, 2.5, 3.0], 2)
    assert parity.seed_band([a, b, c]) == {1: 0.5, 2: 0.5, 3: 1.0}
    same_seed = _seeded("hf", [9.0, 9.0, 9.0], 0)
    assert parity.seed_band([a, same_seed]) is None  # the same seeds twice: one seed
    assert parity.within_seed_band({1: 1.0, 2: float("nan")}, {1: 1.0, 2: 1.0}, {1: 1.0, 2: 1.0}, 0.1) is False
    assert parity._windowed([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
