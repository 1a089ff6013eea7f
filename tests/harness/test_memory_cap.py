"""The memory budget per run: validation, the worker applying and recording it, the over-budget rule."""

from __future__ import annotations

import pytest

from harness.cli import run as run_cli
from harness.measuring import effective, memcap
from harness.running.derive import derive
from harness.running.runner import run_sweep
from harness.spec.scenario import ScenarioError, parse_scenario
from harness.storing import results

BASE = """\
version: 1
name: cap
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: lora, lora_r: 4}}
data: {{seq_len: 32}}
train: {{micro_batch: 2, steps: 2, warmup_steps: 1}}
hardware: {{device: {device}{budget}}}
measure: {{timeout_s: 120, baseline: {baseline}}}
frameworks:
{frameworks}
"""
SIM = "  - {name: dummy, label: d-sim, overrides: {sim_gib_per_token: 0.01}}"  # 64 tokens per micro-batch: 0.64 GiB


def _text(frameworks: str = SIM, device: str = "cpu", budget: str | None = "1", baseline: str = "d-sim") -> str:
    return BASE.format(device=device, budget=f", memory_budget_gib: {budget}" if budget else "",
                       frameworks=frameworks, baseline=baseline)


def test_budget_on_cpu_is_refused_for_a_real_tool():
    with pytest.raises(ScenarioError) as e:
        parse_scenario(_text("  - hf", baseline="hf"))
    assert "hardware.memory_budget_gib: a memory budget needs device cuda (hf)" in str(e.value)
    assert "RLIMIT_AS" in str(e.value)


def test_budget_on_cpu_is_accepted_for_simulated_memory_only():
    assert parse_scenario(_text()).hardware.memory_budget_gib == 1.0
    # a dummy row that does not simulate its memory cannot honour the budget either
    with pytest.raises(ScenarioError, match="needs device cuda \\(dummy\\)"):
        parse_scenario(_text("  - dummy", baseline="dummy"))


def test_budget_on_cuda_validates_with_any_tool():
    sc = parse_scenario(_text("  - hf", device="cuda", budget="24", baseline="hf"))
    assert sc.hardware.memory_budget_gib == 24.0


@pytest.mark.parametrize("budget", ["0", "-8", "5000", ".inf"])
def test_budget_bounds(budget):
    with pytest.raises(ScenarioError, match="hardware.memory_budget_gib"):
        parse_scenario(_text("  - hf", device="cuda", budget=budget, baseline="hf"))


def test_budget_changes_the_scenario_hash_and_is_expected_back():
    capped = parse_scenario(_text())
    free = parse_scenario(_text(budget=None))
    assert capped.content_hash() != free.content_hash()
    assert effective.expected(capped)["memory_budget_gib"] == 1.0
    assert "memory_budget_gib" not in effective.expected(free)
    assert effective.check(capped, {"memory_budget_gib": 2.0}) == [
        "memory_budget_gib: ran with 2.0, scenario says 1.0"]


def test_over_budget_by_nvml_is_invalid():
    cap = {"memory_budget_gib": 24.0, "memory_fraction": 0.17}
    invalid, warn = memcap.check(cap, {"peak_vram_nvml_gib": 24.6, "peak_reserved_gib": 23.0})
    assert invalid == ["memory budget exceeded: NVML per-process peak 24.60 GiB > 24 GiB"] and warn == []
    assert invalid[0].startswith(memcap.OVER_BUDGET)
    assert memcap.check(cap, {"peak_vram_nvml_gib": 23.9}) == ([], [])


def test_without_nvml_the_reserved_peak_is_checked_with_a_warning():
    cap = {"memory_budget_gib": 8.0, "memory_fraction": 0.06}
    invalid, warn = memcap.check(cap, {"peak_vram_nvml_gib": None, "peak_reserved_gib": 8.5})
    assert invalid == ["memory budget exceeded: torch reserved 8.50 GiB > 8 GiB"]
    assert "NVML per-process peak not measured" in warn[0]


def test_cpu_budget_is_recorded_not_enforced_by_the_worker():
    cap = memcap.apply(4.0, "cpu")
    assert cap["memory_budget_gib"] == 4.0 and cap["memory_fraction"] is None
    assert "simulated" in cap["memory_cap_by"]
    assert memcap.check(cap, {"peak_vram_nvml_gib": None}) == ([], [])  # nothing to check on a cpu
    assert memcap.apply(None, "cuda") == {}


@pytest.mark.gpu
def test_cuda_budget_sets_the_per_process_fraction():
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    cap = memcap.apply(2.0, "cuda")
    try:
        # torch gets what the budget leaves once the CUDA context (measured) and a reserve for later kernels are off
        assert 0.2 < cap["outside_torch_gib"] < 1.5 and cap["late_reserve_gib"] == memcap.LATE_RESERVE_GIB
        assert cap["torch_cap_gib"] == pytest.approx(2.0 - cap["outside_torch_gib"] - memcap.LATE_RESERVE_GIB)
        assert cap["memory_fraction"] == pytest.approx(cap["torch_cap_gib"] * memcap.GIB / total)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(1.5 * memcap.GIB), dtype=torch.uint8, device="cuda")
        torch.empty(int(0.5 * memcap.GIB), dtype=torch.uint8, device="cuda")  # within torch's share
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_worker_records_the_budget_and_the_dummy_runs_out_of_memory_above_it(env):
    sc = parse_scenario(_text(SIM + "\n  - {name: dummy, label: d-big, overrides: {sim_gib_per_token: 0.02}}"))
    d = run_sweep(sc, env / "results", quiet=True)
    rows = {r["framework"]: r for r in results.load_runs(d)}
    ok, big = rows["d-sim"], rows["d-big"]
    assert ok["status"] == "ok" and ok["valid"], ok["invalid_reasons"]
    assert ok["metrics"]["memory_budget_gib"] == 1.0 and ok["effective"]["memory_budget_gib"] == 1.0
    assert ok["extra"]["simulated_peak_gib"] == pytest.approx(0.64)
    assert big["status"] == "oom" and "needs 1.28 GiB, budget 1 GiB" in big["reason"]
    assert big["metrics"]["memory_budget_gib"] == 1.0  # a failed run still says what it ran under


def test_run_command_takes_a_budget_and_refuses_one_on_cpu(tmp_path, capsys):
    p = tmp_path / "hf.yaml"
    p.write_text(_text("  - hf", budget=None, baseline="hf"))
    assert run_cli.main([str(p), "--memory-budget-gib", "8", "--results", str(tmp_path / "r")]) == 2
    assert "a memory budget needs device cuda" in capsys.readouterr().err
    sc = parse_scenario(_text(budget=None))
    assert derive(sc, hardware={"memory_budget_gib": 3}).hardware.memory_budget_gib == 3.0
