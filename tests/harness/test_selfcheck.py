"""Hand loops against the harness: the loops run and read their settings back (CPU, tiny-llama, float32), they
hold the adapters' settings, the comparison is built from a stored sweep, stored once per check, and reported."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import make_run, make_sweep  # noqa: E402
from handloop_scenario import HANDLOOP_SCENARIO as SCENARIO  # noqa: E402
from objective_scenario import needs_env  # noqa: E402

from adapters_for_tools.contract import HF_OPTIM  # noqa: E402
from adapters_for_tools.hf import HfOverrides  # noqa: E402
from adapters_for_tools.hf.config import training_args  # noqa: E402
from adapters_for_tools.tunebench.adapter import trainer_config  # noqa: E402
from adapters_for_tools.unsloth import config as unsloth_config  # noqa: E402
from adapters_for_tools.unsloth import handloop as unsloth_loop  # noqa: E402
from harness.analysis import handloop as analysis  # noqa: E402
from harness.cli import selfcheck as selfcheck_cli  # noqa: E402
from harness.inputs import data, models  # noqa: E402
from harness.measuring import effective  # noqa: E402
from harness.measuring.handloop import LOOP_MODULES, tunebench  # noqa: E402
from harness.measuring.handloop.__main__ import run_loop  # noqa: E402
from harness.measuring.handloop.common import StepLog, loader_steps, trainer_steps  # noqa: E402
from harness.measuring.handloop.knobs import HfKnobs, parse_knobs  # noqa: E402
from harness.measuring.meter import StepMeter  # noqa: E402
from harness.reporting import handloop as report_section  # noqa: E402
from harness.reporting.document import Doc  # noqa: E402
from harness.reporting.report import write_report  # noqa: E402
from harness.running.prepare import prepare  # noqa: E402
from harness.spec.scenario import load_scenario  # noqa: E402
from harness.storing.sweep import load_sweep  # noqa: E402

CHECKPOINT_FN = "torch.utils.checkpoint.checkpoint(use_reentrant=False)"


@pytest.fixture(scope="module")
def hf_loop(tiny):  # noqa: ANN001, ANN201
    return run_loop("hf", tiny[1])


@pytest.fixture(scope="module")
def tb_loop(tiny):  # noqa: ANN001, ANN201
    return run_loop("tunebench", tiny[1])


def _non_padding_tokens(sc, steps: range) -> int:  # noqa: ANN001
    """Tokens of the rows of ``steps``: each row's own length, which padding to the micro-batch's widest does not
    change."""
    from transformers import AutoTokenizer  # heavy

    ckpt = models.resolve_checkpoint(sc.model, device="cpu")
    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = [data.tokenize_example(tok, r, "text", sc.data.seq_len) for r in data.build_examples(sc)[0]]
    per_step = sc.train.micro_batch * sc.train.grad_accum
    assert len(rows) == per_step * sc.train.steps, "one epoch exactly: step k reads rows 4k..4k+3"
    return sum(len(rows[i]["input_ids"]) for s in steps for i in range(s * per_step, (s + 1) * per_step))


def test_hf_loop_measures_and_reads_its_settings_back(tiny, hf_loop, tmp_path):
    _, sc = tiny
    assert hf_loop["status"] == "ok", hf_loop.get("traceback")
    assert hf_loop["steps"] == 3 and hf_loop["warmup_steps"] == 1 and hf_loop["steps_measured"] == 2
    assert hf_loop["tokens_per_s"] > 0 and hf_loop["step_s_median"] > 0
    # tokens: the non-padding tokens of the two measured steps, not their padded width
    assert hf_loop["tokens_measured"] == _non_padding_tokens(sc, range(1, 3))
    # the machine during the loop: the host's load at both ends; no NVML readings on a CPU
    assert set(hf_loop["host_load_1m"]) == {"start", "end"} and "telemetry" not in hf_loop
    assert hf_loop["peak_alloc_gib"] is None
    s = hf_loop["settings"]
    # what the HF Trainer does at the hf adapter's TrainingArguments, read back from the live model
    assert s["checkpoint_function"] == CHECKPOINT_FN and s["input_require_grads"] is True
    assert s["attention_mask_fed"] is True and s["attn_implementation"] == "sdpa"
    assert s["optimizer"] == "adamw_torch" and s["autocast"] is None  # float32: no autocast
    assert s["micro_batch"] == 2 and s["grad_accum"] == 2 and s["seq_len"] <= 48
    # the harness's own validity check finds nothing to object to in the loop's settings
    assert effective.check(sc, s) == []
    # the same rows as the sweep: the digest prepare records for its dataset file
    assert s["dataset_sha256_16"] == prepare(sc, tmp_path / "data")["dataset_sha256_16"]


def test_hf_knobs_change_what_the_loop_runs(tiny):
    res = run_loop("hf", tiny[1], steps=2, knob_pairs=["attention_mask=false", "input_require_grads=false"])
    assert res["status"] == "ok", res.get("traceback")
    s = res["settings"]
    assert s["attention_mask_fed"] is False and s["input_require_grads"] is False
    assert s["hand_loop_knobs"]["attention_mask"] is False and s["checkpoint_function"] == CHECKPOINT_FN
    assert parse_knobs(["optimizer=adamw_torch_fused"]).optimizer == "adamw_torch_fused"
    for bad in (["attention_mask=maybe"], ["no_such_knob=1"], ["attention_mask"]):
        with pytest.raises(ValueError):
            parse_knobs(bad)
    refused = run_loop("tunebench", tiny[1], knob_pairs=["attention_mask=false"])
    assert refused["status"] == "error" and "hf's" in refused["reason"]


def test_tunebench_loop_runs_the_library(tiny, tb_loop, hf_loop):
    _, sc = tiny
    assert tb_loop["status"] == "ok", tb_loop.get("traceback")
    assert tb_loop["tokens_per_s"] > 0 and tb_loop["steps_measured"] == 2
    s = tb_loop["settings"]
    assert effective.check(sc, s) == [] and s["gradient_checkpointing"] is True and s["lora_r"] == 4
    assert s["trainer"]["method"]["kind"] == "lora" and s["device"] == "cpu"
    # same rows in the same order as the hf loop: the same tokens, and (fp32, same loss normalisation) the same
    # losses; tests/kernels/test_trainer_hf_parity.py holds the trainer to hf much tighter
    assert tb_loop["tokens_measured"] == hf_loop["tokens_measured"]
    assert s["dataset_sha256_16"] == hf_loop["settings"]["dataset_sha256_16"]
    assert max(abs(a - b) for a, b in zip(tb_loop["losses"], hf_loop["losses"], strict=True)) < 1e-3


def test_loops_hold_the_adapters_settings(tiny, tmp_path):
    """Each loop writes down its adapter's settings by hand (measuring sits below the adapters' heavy side);
    these keep the two equal."""
    _, sc = tiny
    args, knobs = training_args(sc, tmp_path, HfOverrides()), HfKnobs()
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": knobs.use_reentrant}
    assert args["optim"] == HF_OPTIM[sc.train.optimizer] and knobs.optimizer is None  # None: the scenario's
    from transformers import TrainingArguments  # heavy

    # the Trainer's per-micro-batch NaN/Inf check (a device sync) runs in the loop as the adapter's Trainer runs it
    assert TrainingArguments(**args).logging_nan_inf_filter is knobs.nan_inf_filter is True
    assert tunebench.trainer_config(sc, 7) == trainer_config(sc, {}, 7)
    # the Unsloth loop builds its model and trainer from the adapter's own functions (it sits beside the adapter)
    assert LOOP_MODULES["unsloth"] == unsloth_loop.__name__ and unsloth_loop.us_config is unsloth_config


def test_loops_group_a_tools_loader_as_the_trainer_does():
    """loader_steps (the Unsloth loop reads its trainer's data loader through it) groups batches into steps as
    the hf loop's trainer_steps does: grad_accum per step, the epoch's last step short, then the next epoch."""
    rows = [{"input_ids": [i]} for i in range(5)]

    def ids(steps) -> list[list[int]]:  # noqa: ANN001
        return [[b["input_ids"] for b in step] for step in steps]

    got = ids(trainer_steps(rows, 1, 2, 5, lambda feats: feats[0], False))
    assert got == [[[0], [1]], [[2], [3]], [[4]], [[0], [1]], [[2], [3]]]
    assert ids(loader_steps([r for r in rows], 2, 5)) == got
    with pytest.raises(ValueError, match="no batch"):
        list(loader_steps([], 1, 1))


def test_loop_reads_padding_free_rows_by_the_harness_rules():
    """A tool's padding-free row (two samples joined, position_ids restarting) is read as the meter reads it: two
    samples of their own length, not one row of their sum; packed rows stay rows."""
    row = {"input_ids": torch.ones(1, 7, dtype=torch.long), "labels": torch.ones(1, 7, dtype=torch.long),
           "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]])}
    log, meter = StepLog(), StepMeter(warmup_steps=0, device="cpu")
    log.add(0.1, [row], 1.0)
    meter.count_batch(row)
    meter.step_begin()
    meter.step_end(1.0)
    assert log.geometry(packing=False) == effective.from_meter(meter) == {
        "micro_batch": 2, "grad_accum": 1, "seq_len": 4, "tokens_per_step": 7.0, "padding_free_rows": True}
    assert log.geometry(packing=True) == effective.from_meter(meter, packing=True) == {
        "micro_batch": 1, "grad_accum": 1, "seq_len": 7, "tokens_per_step": 7.0}


def test_unsloth_trainer_rows_carry_the_bos_text():
    """The rows the adapter and its loop give Unsloth's trainer: the BOS text first (Unsloth tokenises without
    special tokens when the text has it), the sweep's list itself where nothing changes."""
    rows, tok = [{"text": "a b"}, {"text": "<s>c"}], SimpleNamespace(bos_token="<s>")
    got, notes = unsloth_config.trainer_rows(rows, "text", tok)
    assert [r["text"] for r in got] == ["<s>a b", "<s>c"] and "BOS" in notes["data"]
    assert unsloth_config.trainer_rows(got, "text", tok) == (got, {})
    assert unsloth_config.trainer_rows(got, "text", tok)[0] is got


def test_unsloth_loop_is_unavailable_without_unsloth(tiny):
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth imports here: the loop would run")
    res = run_loop("unsloth", tiny[1])
    assert res["status"] == "unavailable" and "unsloth" in res["reason"]


# -- the comparison, its storage and the report, on a synthetic sweep -----------------------------------------------
def _loop(tokens_per_s: float, **settings) -> dict:  # noqa: ANN003
    """A hand loop's result as run_loop returns it (clearly fake figures)."""
    eff = {"train_mode": True, "gradient_checkpointing": True, "dtype": "bfloat16", "micro_batch": 2,
           "grad_accum": 2, "optimizer": "adamw_torch", "lr": 2e-4, "lora_r": 16,
           "dataset_sha256_16": "feedfacefeedface", "checkpoint": "/synthetic/checkpoint",
           "attn_implementation": "sdpa", "attention_mask_fed": True, "timing": "synthetic"}
    return {"status": "ok", "reason": None, "tokens_per_s": tokens_per_s, "step_s_median": 512 / tokens_per_s,
            "steps": 10, "warmup_steps": 2, "peak_alloc_gib": 7.5, "settings": eff | settings}


LOOPS = {"hf": _loop(1000.0),  # the harness's median is 1020: +2.0 %, agrees
         "tunebench": _loop(1300.0, gradient_checkpointing=False),  # 1500 against 1300: +15.4 %, differs
         "unsloth": {"framework": "unsloth", "status": "unavailable", "reason": "unsloth is not importable here"}}


@pytest.fixture
def sweep_dir(tmp_path):  # noqa: ANN001, ANN201
    # no step-time jitter: each run's tokens/s is exactly the one given
    runs = [make_run("hf", 0, tokens_per_s=1000, jitter=0), make_run("hf", 1, tokens_per_s=1040, jitter=0),
            make_run("tunebench", 0, tokens_per_s=1500, jitter=0)]
    return make_sweep(tmp_path / "results" / "synthetic-tiny-20260101-000000", runs)


def test_comparison_puts_each_loop_beside_the_stored_figure(sweep_dir):
    got = analysis.compare(load_sweep(sweep_dir), LOOPS)
    hf, tb, us = got["hf"], got["tunebench"], got["unsloth"]
    assert hf["status"] == "compared" and hf["harness"]["repeats_ok"] == 2
    assert hf["harness"]["tokens_per_s"] == pytest.approx(1020, rel=1e-6)  # the report's median over repeats
    assert hf["difference_pct"] == pytest.approx(2.0, abs=1e-6) and hf["verdict"] == "agrees"
    assert hf["settings_differ"] == []
    # what only the loop records is kept beside, not called a difference
    assert hf["not_recorded_by_harness"]["attention_mask_fed"] is True
    assert "timing" not in hf["not_recorded_by_harness"]
    assert tb["difference_pct"] == pytest.approx(100 * 200 / 1300) and tb["verdict"] == "differs"
    assert tb["settings_differ"] == [{"key": "gradient_checkpointing", "harness": True, "loop": False}]
    assert "gradient_checkpointing: harness True, loop False" in analysis.cause(tb)
    assert us == {"framework": "unsloth", "status": "loop unavailable", "reason": "unsloth is not importable here"}
    missing = analysis.compare_framework(load_sweep(sweep_dir), "trl", _loop(900.0))
    assert missing["status"] == "no harness run" and "no stored run" in missing["reason"]
    assert analysis.verdict(-3.0) == "agrees" and analysis.verdict(3.01) == "differs"


def test_selfcheck_is_stored_once_per_check_and_reported(sweep_dir, tmp_path, monkeypatch, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    monkeypatch.setattr(selfcheck_cli, "run_loop", lambda fw, *a: LOOPS[fw])
    argv = [str(scenario), "--against", str(sweep_dir)]
    old = os.umask(0o022)
    try:
        assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_DIFFERS  # tunebench differs by more than 3 %
        first = (sweep_dir / "selfcheck.json").read_bytes()
        assert selfcheck_cli.main(argv + ["--out", str(tmp_path / "copy.json")]) == selfcheck_cli.EXIT_DIFFERS
    finally:
        os.umask(old)
    assert (sweep_dir / "selfcheck.json").read_bytes() == first  # never overwritten: the second is -2
    assert analysis.selfcheck_paths(sweep_dir) == [sweep_dir / "selfcheck.json", sweep_dir / "selfcheck-2.json"]
    assert stat.S_IMODE((sweep_dir / "selfcheck.json").stat().st_mode) == 0o644
    check = json.loads(first)
    assert check["frameworks"]["hf"]["verdict"] == "agrees" and check["loops"]["hf"]["tokens_per_s"] == 1000.0
    assert json.loads((tmp_path / "copy.json").read_text())["frameworks"] == check["frameworks"]
    out = capsys.readouterr().out
    assert "hf: harness 1,020 tokens/s, hand loop 1,000 tokens/s, +2.0 % -> agrees" in out
    assert "tunebench:" in out and "differs (gradient_checkpointing" in out

    md = write_report(sweep_dir, tmp_path / "rep").read_text()
    section = md.split("## Harness vs hand loop", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[2].strip(): line for line in section.splitlines()
            if line.startswith("| selfcheck.json")}
    assert "agrees" in rows["hf"] and "+2.0 %" in rows["hf"]
    assert "**differs by +15.4 %**" in rows["tunebench"]
    assert "**gradient_checkpointing: harness True, loop False**" in rows["tunebench"]
    assert "loop unavailable: unsloth is not importable here" in rows["unsloth"]
    assert "1 framework figure(s) differ from the hand loop" in section  # tunebench, by its latest check


def test_no_section_without_a_check_and_an_unreadable_check_is_named(sweep_dir):
    doc = Doc("t")
    report_section.add_section(doc, load_sweep(sweep_dir))
    assert doc.blocks == []
    (sweep_dir / "selfcheck.json").write_text("{not json")
    report_section.add_section(doc, load_sweep(sweep_dir))
    assert "`selfcheck.json` cannot be read as a check" in doc.to_markdown()
    assert analysis.next_selfcheck_path(sweep_dir).name == "selfcheck-2.json"


def test_bad_input_exits_2(sweep_dir, tmp_path, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    assert selfcheck_cli.main([str(scenario), "--frameworks", "hf,unslot"]) == selfcheck_cli.EXIT_BAD_INPUT
    assert "did you mean 'unsloth'?" in capsys.readouterr().err
    assert selfcheck_cli.main([str(scenario), "--against", str(tmp_path / "nowhere")]) == 2
    assert selfcheck_cli.main([str(scenario), "--set", "colour=blue"]) == 2
    assert not analysis.selfcheck_paths(sweep_dir)


def test_cli_runs_a_loop_in_its_own_process(tiny):
    """The command's wiring: the loop in a fresh interpreter in the framework's environment, its JSON back."""
    path, sc = tiny
    res = selfcheck_cli.run_loop("tunebench", path, sc, 2, [])
    assert res["status"] == "ok", res.get("reason")
    assert res["steps"] == 2 and res["tokens_per_s"] > 0 and res["settings"]["gradient_checkpointing"] is True


# -- side by side: the harness's own runs and the loops in alternating pairs on one machine --------------------------
def _pairing(monkeypatch, harness_tps: dict[str, list[float]], loop_tps: dict[str, list[float]]) -> list[str]:  # noqa: ANN001
    """Stub the harness runs and loops with the given tokens/s per round; returns the order they were called in."""
    calls: list[str] = []
    rounds = {"harness": dict.fromkeys(harness_tps, 0), "loop": dict.fromkeys(loop_tps, 0)}

    def harness(fw, *a):  # noqa: ANN001, ANN002, ANN202
        calls.append(f"{fw}:harness")
        i = rounds["harness"][fw]
        rounds["harness"][fw] += 1
        run = make_run(fw, 0, tokens_per_s=harness_tps[fw][i], jitter=0)
        run["metrics"]["nvml_sampler_busy_pct"] = 2.0 + i  # the sampler thread's share: 2 % then 3 %
        return run

    def loop(fw, *a):  # noqa: ANN001, ANN002, ANN202
        calls.append(f"{fw}:loop")
        i = rounds["loop"][fw]
        rounds["loop"][fw] += 1
        return _loop(loop_tps[fw][i])

    monkeypatch.setattr(selfcheck_cli, "run_harness", harness)
    monkeypatch.setattr(selfcheck_cli, "run_loop", loop)
    return calls


def test_side_by_side_alternates_and_its_pairs_are_the_verdict(sweep_dir, tmp_path, monkeypatch, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    # tunebench: the stored sweep's 1500 is +15.4 % over a loop at 1300, but run side by side the harness's own runs
    # and the loops agree (1290/1310 against 1300/1280: +0.4 % of the medians); hf agrees both ways
    calls = _pairing(monkeypatch, {"hf": [1010, 1000], "tunebench": [1290, 1310]},
                     {"hf": [1000, 1005], "tunebench": [1300, 1280]})
    argv = [str(scenario), "--frameworks", "hf,tunebench", "--against", str(sweep_dir), "--side-by-side", "2"]
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_OK
    assert calls == ["hf:harness", "hf:loop", "tunebench:harness", "tunebench:loop",  # round 0: harness first
                     "hf:loop", "hf:harness", "tunebench:loop", "tunebench:harness"]  # round 1: the loop first
    check = json.loads((sweep_dir / "selfcheck.json").read_text())
    assert check["side_by_side_rounds"] == 2 and len(check["pairs"]["tunebench"]) == 2
    assert check["pairs"]["tunebench"][0]["harness_run"]["metrics"]["tokens_per_s"] == pytest.approx(1290)
    tb = check["side_by_side"]["tunebench"]
    assert tb["status"] == "compared" and tb["rounds"] == 2 and tb["order"] == ["harness", "loop"]
    assert tb["harness_tokens_per_s"] == pytest.approx(1300) and tb["loop_tokens_per_s"] == pytest.approx(1290)
    assert tb["difference_pct"] == pytest.approx(100 * 10 / 1290) and tb["verdict"] == "agrees"
    assert tb["pair_differences_pct"] == pytest.approx([100 * -10 / 1300, 100 * 30 / 1280])
    assert tb["harness_spread_pct"] == pytest.approx(100 * 20 / 1300)
    assert tb["harness_sampler_busy_pct"] == pytest.approx(2.5)  # median of the rounds' 2 % and 3 %
    assert check["frameworks"]["tunebench"]["verdict"] == "differs"  # the stored sweep, against round 0's loop
    out = capsys.readouterr().out
    assert ("tunebench side by side (2 rounds): harness 1,300 tokens/s, hand loop 1,290 tokens/s, +0.8 % -> agrees"
            in out)

    md = write_report(sweep_dir, tmp_path / "rep").read_text()
    section = md.split("## Harness vs hand loop", 1)[1].split("\n## ", 1)[0]
    assert "framework figure(s) differ" not in section  # the pairs decide, and they agree
    stored = next(line for line in section.splitlines() if line.startswith("| selfcheck.json | tunebench | 1,500"))
    assert "differs by +15.4 % from the stored sweep" in stored and "side by side on one machine" in stored
    paired = next(line for line in section.splitlines() if line.startswith("| selfcheck.json | tunebench | 2 ("))
    assert "harness, loop first" in paired and "+0.8 %" in paired and "-0.8 %, +2.3 %" in paired
    assert "agrees" in paired and "1.5 % / 1.6 %" in paired and "| 2.5 % |" in paired


def test_side_by_side_that_differs_fails_the_check(sweep_dir, tmp_path, monkeypatch, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    _pairing(monkeypatch, {"hf": [900]}, {"hf": [1000]})
    argv = [str(scenario), "--frameworks", "hf", "--against", str(sweep_dir), "--side-by-side", "1"]
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_DIFFERS  # -10 % side by side, though +2 % stored
    assert "hf side by side (1 rounds): harness 900 tokens/s, hand loop 1,000 tokens/s, -10.0 % -> differs" in \
        capsys.readouterr().out
    section = write_report(sweep_dir, tmp_path / "rep").read_text().split("## Harness vs hand loop", 1)[1]
    assert "1 framework figure(s) differ from the hand loop" in section
    assert "The machine during the pairs" not in section  # nothing else ran and nothing slowed
    assert "within one side's own spread" not in section  # one round: no spread to hide in

    # a later check with more rounds decides the headline; the earlier one stays in the table. Its pairs differ by
    # less than the loop moved between its own rounds (+4.0 % of the medians, the loop's rounds 10.9 % apart)
    _pairing(monkeypatch, {"hf": [1030, 1060]}, {"hf": [1060, 950]})
    assert selfcheck_cli.main(argv[:-1] + ["2"]) == selfcheck_cli.EXIT_DIFFERS
    _pairing(monkeypatch, {"hf": [1000, 1010, 990]}, {"hf": [1000, 1000, 1005]})
    assert selfcheck_cli.main(argv[:-1] + ["3"]) == selfcheck_cli.EXIT_OK
    section = write_report(sweep_dir, tmp_path / "rep").read_text().split("## Harness vs hand loop", 1)[1]
    assert "framework figure(s) differ" not in section and "latest check agrees" in section
    noisy = next(line for line in section.splitlines() if line.startswith("| selfcheck-2.json | hf | 2 ("))
    assert "differs by +4.0 %, within one side's own spread between rounds (10.9 %)" in noisy
    assert "**differs by -10.0 %**" in next(line for line in section.splitlines()
                                           if line.startswith("| selfcheck.json | hf | 1 ("))
    # a round whose harness run stored nothing is said, not averaged in
    got = analysis.compare_side_by_side("hf", [{"round": 0, "first": "harness", "harness_run": None,
                                                 "loop": _loop(1000.0)}])
    assert got["status"] == "no pair ran" and "harness error" in got["reason"] and "stored no result" in got["reason"]
    why = {"status": "error", "reason": "harness run stored no result: ValueError: boom"}  # as run_harness says it
    got = analysis.compare_side_by_side("hf", [{"round": 0, "first": "loop", "harness_run": why, "loop": _loop(1e3)}])
    assert got["status"] == "no pair ran" and "ValueError: boom" in got["reason"]


def test_side_by_side_names_what_the_machine_did_during_a_pair(sweep_dir, tmp_path, monkeypatch):
    """Another process on the GPU during a loop, or a harness run on a slowed GPU, is named beside the pairs (both
    sides record them: the run's metrics, the loop's MachineWatch); the software power cap alone is not slowing."""
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    _pairing(monkeypatch, {"hf": [900, 1000]}, {"hf": [1000, 1000]})
    busy_loop = _loop(1000.0) | {"foreign_gpu_processes": [{"pid": 4242, "max_gib": 3.25}],
                                 "throttle_reasons_seen": ["sw_power_cap"]}
    hot_run = make_run("hf", 0, tokens_per_s=900, jitter=0)
    hot_run["metrics"]["throttle_reasons_seen"] = ["sw_power_cap", "hw_thermal_slowdown"]
    got = analysis.compare_side_by_side("hf", [
        {"round": 0, "first": "harness", "harness_run": hot_run, "loop": _loop(1000.0)},
        {"round": 1, "first": "loop", "harness_run": make_run("hf", 0, tokens_per_s=1000, jitter=0),
         "loop": busy_loop}])
    assert got["machine"] == ["round 0 harness: the GPU slowed (hw_thermal_slowdown)",
                              "round 1 loop: another process on the GPU (pid 4242 3.2 GiB)"]
    selfcheck_cli.main([str(scenario), "--frameworks", "hf", "--against", str(sweep_dir), "--side-by-side", "2"])
    path = sweep_dir / "selfcheck.json"
    check = json.loads(path.read_text())
    check["side_by_side"]["hf"] = got
    path.write_text(json.dumps(check))
    section = write_report(sweep_dir, tmp_path / "rep").read_text().split("## Harness vs hand loop", 1)[1]
    assert ("The machine during the pairs (a figure measured beside another process on the GPU, or on a slowed GPU, "
            "moves for that reason): selfcheck.json hf round 0 harness: the GPU slowed (hw_thermal_slowdown); "
            "selfcheck.json hf round 1 loop: another process on the GPU (pid 4242 3.2 GiB).") in section


def test_side_by_side_refuses_what_the_harness_cannot_run(tmp_path, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    assert selfcheck_cli.main([str(scenario), "--side-by-side", "2", "--steps", "2"]) == selfcheck_cli.EXIT_BAD_INPUT
    assert "no --steps" in capsys.readouterr().err
    # the scenario lists hf and tunebench: no unsloth row for the harness to run
    assert selfcheck_cli.main([str(scenario), "--side-by-side", "1"]) == selfcheck_cli.EXIT_BAD_INPUT
    assert "no row 'unsloth'" in capsys.readouterr().err
    assert selfcheck_cli.main([str(scenario), "--side-by-side", "-1"]) == selfcheck_cli.EXIT_BAD_INPUT


def test_an_interrupted_check_keeps_its_pairs_and_resumes(sweep_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the third measurement: the two finished pairs stay in the work file, no check is stored; the same
    command again runs only the missing pairs, stores the whole check once and removes the work file."""
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    calls = _pairing(monkeypatch, {"hf": [1010, 1000], "tunebench": [1290, 1310]},
                     {"hf": [1000, 1005], "tunebench": [1300, 1280]})
    real_loop = selfcheck_cli.run_loop

    def stop_in_round_1(fw, *a):  # noqa: ANN001, ANN002, ANN202
        if len(calls) == 4:  # round 0 is done (both frameworks): round 1 starts with hf's loop
            raise KeyboardInterrupt
        return real_loop(fw, *a)

    monkeypatch.setattr(selfcheck_cli, "run_loop", stop_in_round_1)
    argv = [str(scenario), "--frameworks", "hf,tunebench", "--against", str(sweep_dir), "--side-by-side", "2"]
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_INTERRUPTED
    assert "2 of 4 measurements finished, kept in" in capsys.readouterr().err
    assert not analysis.selfcheck_paths(sweep_dir)
    [work] = sweep_dir.glob(f"{analysis.PARTIAL_PREFIX}*.json")
    kept = json.loads(work.read_text())
    assert sorted(kept["done"]) == ["round 0 hf", "round 0 tunebench"]
    assert kept["key"]["frameworks"] == ["hf", "tunebench"] and kept["key"]["side_by_side"] == 2
    section = write_report(sweep_dir, tmp_path / "rep").read_text().split("## Harness vs hand loop", 1)[1]
    assert f"`{work.name}`: an unfinished check (2 measurement(s) kept)" in section
    # another check (other frameworks) has a work file of its own and does not touch this one
    monkeypatch.setattr(selfcheck_cli, "run_loop", lambda fw, *a: _loop(1000.0))
    assert selfcheck_cli.main([str(scenario), "--frameworks", "hf", "--against", str(sweep_dir)]) == 0
    assert work.read_text() == json.dumps(kept, indent=1)

    monkeypatch.setattr(selfcheck_cli, "run_loop", real_loop)
    del calls[:]
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_OK
    assert "resuming" in capsys.readouterr().out
    assert calls == ["hf:loop", "hf:harness", "tunebench:loop", "tunebench:harness"]  # round 1 only, loop first
    check = json.loads(analysis.selfcheck_paths(sweep_dir)[-1].read_text())
    tb = check["side_by_side"]["tunebench"]
    assert tb["rounds"] == 2 and tb["pair_differences_pct"] == pytest.approx([100 * -10 / 1300, 100 * 30 / 1280])
    assert [p["round"] for p in check["pairs"]["hf"]] == [0, 1] and check["pairs"]["hf"][0]["finished"]
    assert not work.exists()


def test_loops_keep_their_progress_beside_out_and_a_stopped_child_stops_the_check(tmp_path, monkeypatch, capsys):
    scenario = tmp_path / "handloop_test.yaml"
    scenario.write_text(SCENARIO)
    ran: list[str] = []

    def loop(fw, *a):  # noqa: ANN001, ANN002, ANN202
        if fw == "tunebench" and not ran.count("hf"):
            raise AssertionError("hf runs first")
        ran.append(fw)
        if fw == "tunebench" and ran.count("tunebench") == 1:
            raise KeyboardInterrupt
        return _loop(1000.0)

    monkeypatch.setattr(selfcheck_cli, "run_loop", loop)
    out = tmp_path / "check.json"
    argv = [str(scenario), "--frameworks", "hf,tunebench", "--out", str(out)]
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_INTERRUPTED
    assert not out.exists() and len(list(tmp_path.glob("check.json.partial-*.json"))) == 1
    assert selfcheck_cli.main(argv) == selfcheck_cli.EXIT_OK
    assert ran == ["hf", "tunebench", "tunebench"]  # hf's loop is not run again
    assert json.loads(out.read_text())["loops"]["hf"]["tokens_per_s"] == 1000.0
    assert not list(tmp_path.glob("check.json.partial-*.json"))
    capsys.readouterr()
    # a child that exited for the Ctrl-C (the harness run's 130, a loop killed by SIGINT) is no measurement
    for code in (130, -2):
        with pytest.raises(KeyboardInterrupt):
            selfcheck_cli._stopped(subprocess.CompletedProcess([], code))
    selfcheck_cli._stopped(subprocess.CompletedProcess([], 1))  # a failure is a measurement (an error row)


def test_the_harness_side_is_a_real_run_of_the_row(tiny):
    """The command's wiring: `harness run --only ROW` in a private results folder, its stored run JSON back."""
    path, sc = tiny
    run = selfcheck_cli.run_harness("tunebench", path, sc)
    assert run is not None and run["status"] == "ok", run and run.get("reason")
    assert run["framework"] == "tunebench" and run["metrics"]["tokens_per_s"] > 0
    assert analysis.harness_figures(run)["tokens_per_s"] == pytest.approx(run["metrics"]["tokens_per_s"])
    # the run's timeline: start-up and loading before its first step, saving after its last
    assert run["started_at"] < run["first_step_at"] < run["last_step_at"] <= run["finished_at"]
    assert sum(s["step_s"] for s in run["steps"]) <= run["last_step_at"] - run["first_step_at"]


def test_a_real_check_stopped_by_sigint_resumes(tiny, tmp_path):
    """The deadline's way of stopping a check on a lent machine (`timeout -s INT`: SIGINT to the whole process
    group, the check and its children alike): the finished pair is kept, and the same command finishes the check."""
    path, _ = tiny
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "harness", "selfcheck", str(path), "--frameworks", "tunebench", "--side-by-side",
           "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("check.json.partial-*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the first pair did not finish"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == selfcheck_cli.EXIT_INTERRUPTED, err[-2000:]
    assert "1 of 2 measurements finished" in err and "Traceback" not in err
    [work] = tmp_path.glob("check.json.partial-*.json")
    assert list(json.loads(work.read_text())["done"]) == ["round 0 tunebench"]
    assert not out.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode in (selfcheck_cli.EXIT_OK, selfcheck_cli.EXIT_DIFFERS), done.stderr[-2000:]
    assert "resuming" in done.stdout
    pairs = json.loads(out.read_text())["pairs"]["tunebench"]
    assert [p["round"] for p in pairs] == [0, 1] and all(p["loop"]["status"] == "ok" for p in pairs)
    assert not work.exists()


GPU_QLORA = """\
version: 1
name: handloop_unsloth_gpu
model: {preset: tiny-llama, weights: random, dtype: bfloat16, seed: 0}
method: {kind: qlora, lora_r: 8, lora_alpha: 16, target_modules: all-linear}
data: {source: synthetic, seq_len: 1024, lengths: fixed}
train: {micro_batch: 2, grad_accum: 1, steps: 6, warmup_steps: 2, lr: 2.0e-4, optimizer: adamw_torch_fused,
        gradient_checkpointing: true}
hardware: {device: cuda}
frameworks: [unsloth]
"""


@pytest.mark.gpu
@needs_env("unsloth")
def test_unsloth_loop_runs_the_adapters_checkpoint_mode_on_the_gpu(tmp_path, monkeypatch):
    """The Unsloth loop checkpoints as the adapter's trainer makes it (Unsloth's offloading function on every
    layer, read back from the live model), at a length where Unsloth keeps its offloading mode (512 tokens and up),
    and its harness run reads back the same mode."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "handloop_unsloth_gpu.yaml"
    path.write_text(GPU_QLORA)
    sc = load_scenario(path)
    loop = selfcheck_cli.run_loop("unsloth", path, sc, None, [])
    assert loop["status"] == "ok", loop.get("reason")
    assert loop["settings"]["unsloth_gradient_checkpointing"] == "unsloth"
    assert loop["settings"]["gradient_checkpointing_offload"] is True
    run = selfcheck_cli.run_harness("unsloth", path, sc)
    assert run is not None and run["status"] == "ok", run and run.get("reason")
    got = analysis.compare_side_by_side("unsloth", [{"round": 0, "first": "harness", "harness_run": run,
                                                      "loop": loop}])
    differ = {d["key"] for d in got["settings_differ"]}
    assert not differ & {"unsloth_gradient_checkpointing", "gradient_checkpointing_offload", "checkpoint_function"}
