"""harness.reporting on synthetic sweeps: files written, self-contained HTML, failures visible, "—" for n/a."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_results import environment_dict, eval_dict, make_run, make_sweep  # noqa: E402

from harness.analysis.aggregate import is_empty  # noqa: E402
from harness.cli import report as report_cli  # noqa: E402
from harness.reporting.document import fmt  # noqa: E402
from harness.reporting.report import default_out_dir, write_report  # noqa: E402

INVALID = "gradient_checkpointing: ran with False, scenario says True"


@pytest.fixture(scope="module")
def gpu_sweep(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("gpu")
    runs = [
        make_run("hf", 0, tokens_per_s=1000), make_run("hf", 1, tokens_per_s=1040),
        make_run("tunebench", 0, tokens_per_s=1500, vram_gib=8.0),
        make_run("tunebench", 1, tokens_per_s=1530, vram_gib=8.0),
        make_run("trl", 0, tokens_per_s=900, effective={"gradient_checkpointing": False}, invalid_reasons=[INVALID]),
        make_run("trl", 1, tokens_per_s=910),
        make_run("unsloth", 0, status="unavailable", reason="environment 'unsloth' not created: run `env create`"),
        make_run("unsloth", 1, status="unavailable", reason="environment 'unsloth' not created: run `env create`"),
        make_run("axolotl", 0, status="oom", reason="torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"),
        make_run("axolotl", 1, status="timeout", reason="no result within 1800 s (killed)", with_metrics=False),
    ]
    return make_sweep(tmp_path / "results" / "synthetic-tiny-20260101-000000", runs)


@pytest.fixture(scope="module")
def gpu_report(gpu_sweep, tmp_path_factory) -> Path:
    """The report of ``gpu_sweep``, written once for the tests that only read it (charts take ~1 s each here)."""
    return write_report(gpu_sweep, tmp_path_factory.mktemp("rep") / "rep")


def _section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].strip("*") == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r}")


def test_writes_markdown_html_and_charts(gpu_report):
    out = gpu_report.parent
    md_path = gpu_report
    assert md_path.name == "report.md"
    for name in ("report.md", "report.html", "throughput.png", "memory.png", "loss.png", "tps_vs_memory.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = md_path.read_text()
    assert "python -m harness run scenarios/synthetic.yaml" in md
    for chart in ("throughput.png", "memory.png", "loss.png", "tps_vs_memory.png"):
        assert f"]({chart})" in md
    scen = _section(md, "Scenario")
    for key in ("model", "method", "seq_len", "micro_batch", "grad_accum", "steps", "precision", "device"):
        assert f"| {key} |" in scen
    assert "4·N" in md and "6·N" in md and "NOT counted" in md
    assert "989.4 TFLOP/s (datasheet dense bf16 (H100 80GB HBM3))" in md


def test_html_is_self_contained(gpu_report):
    page = gpu_report.with_name("report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) >= 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<style>" in page


def test_comparison_aggregates_repeats_and_speedup(gpu_report):
    md = gpu_report.read_text()
    comp = _section(md, "Comparison")
    hf = _table_row(comp, "hf")
    tb = _table_row(comp, "tunebench")
    assert hf[2] == "2/2" and tb[2] == "2/2"
    assert hf[6].startswith("1.00x")
    hf_tps = float(hf[3].replace(",", ""))
    tb_tps = float(tb[3].replace(",", ""))
    assert tb[6].endswith("x") and float(tb[6][:-1]) == pytest.approx(tb_tps / hf_tps, abs=0.011)
    assert float(tb[6][:-1]) > 1.4  # tunebench ~1515 vs hf ~1020 tokens/s
    assert tb[7] == "8.00" and hf[7] == "10.00"  # NVML peak per framework
    assert tb[8] == "80.0 %" and hf[8] == "100.0 %"  # ... and against the baseline's
    lo, hi = (float(x.replace(",", "")) for x in tb[4].split("–"))
    assert lo < tb_tps < hi  # min–max over repeats brackets the median


def test_failures_and_invalid_runs_are_visible(gpu_report):
    md = gpu_report.read_text()
    comp = _section(md, "Comparison")
    unsloth = _table_row(comp, "unsloth")
    assert "unavailable" in unsloth[1] and "not created" in unsloth[1]
    assert unsloth[2] == "0/2" and unsloth[3] == "—"
    axo = _table_row(comp, "axolotl")
    assert "oom" in axo[1] and "timeout" in axo[1]
    assert "INVALID" in _table_row(comp, "trl")[-1]
    caveats = _section(md, "Failures and caveats")
    for text in ("unsloth r0", "unsloth r1", "axolotl r0: oom", "axolotl r1: timeout", "CUDA out of memory",
                 "trl r0: ran but is INVALID", INVALID):
        assert text in caveats, text
    eff = _section(md, "Effective settings")
    assert "**False ≠**" in _table_row(eff, "`gradient_checkpointing`")[4]
    page = gpu_report.with_name("report.html").read_text()
    assert 'class="bad"' in page and "CUDA out of memory" in page and 'class="diff"' in page


def test_cpu_values_render_as_dash_never_zero(tmp_path):
    runs = [make_run("hf", 0, device="cpu", tokens_per_s=200), make_run("tunebench", 0, device="cpu", tokens_per_s=300)]
    d = make_sweep(tmp_path / "results" / "cpu-20260101-000000", runs, device="cpu")
    out = tmp_path / "rep"
    md = write_report(d, out).read_text()
    comp = _section(md, "Comparison")
    row = _table_row(comp, "tunebench")
    header = _table_row(comp, "framework")
    cells = dict(zip(header, row, strict=True))
    for col in ("peak VRAM NVML (GiB)", "NVML vs hf", "device total (GiB)", "torch alloc / reserved (GiB)", "MFU"):
        assert cells[col] == "—", (col, cells[col])
    assert "0.00" not in cells["peak VRAM NVML (GiB)"]
    gpu = _table_row(_section(md, "Environment"), "GPU")
    assert gpu[1].startswith("—")
    assert (out / "memory.png").is_file()  # host RSS is charted where no GPU memory exists
    assert "cpu: no MFU" in md


def test_the_scenario_table_says_what_every_framework_trained_on(tmp_path):
    """The dataset file's record: its rows, how many times a file smaller than the steps' reads was read over, the
    rows left out; a sweep stored before runs carried the record shows the source alone."""
    meta = {"format": "alpaca", "rows": 40, "passes": 8, "rows_without_loss_left_out": 2}
    runs = [make_run("hf", 0, device="cpu") | {"dataset": meta}, make_run("tunebench", 0, device="cpu")]
    d = make_sweep(tmp_path / "results" / "data-20260101-000000", runs, device="cpu")
    md = write_report(d, tmp_path / "rep").read_text()
    assert _table_row(_section(md, "Scenario"), "data")[1] == (
        "synthetic (alpaca): 40 rows: its 5 read 8 times over, in order (the steps read more rows than it holds); "
        "2 left out (no loss-bearing token within seq_len)")
    old = make_sweep(tmp_path / "results" / "old-20260101-000000", [make_run("hf", 0, device="cpu")], device="cpu")
    assert _table_row(_section(write_report(old, tmp_path / "rep2").read_text(), "Scenario"), "data")[1] == \
        "synthetic"


def test_baseline_without_ok_run_says_so(tmp_path):
    runs = [make_run("hf", 0, status="error", reason="ValueError: synthetic"), make_run("tunebench", 0)]
    d = make_sweep(tmp_path / "sw", runs)
    md = write_report(d, tmp_path / "rep").read_text()
    assert "Baseline `hf` has no ok run" in md
    assert _table_row(_section(md, "Comparison"), "tunebench")[6] == "—"
    assert "ValueError: synthetic" in _section(md, "Failures and caveats")


def test_quality_section_only_with_eval(gpu_report, tmp_path):
    assert "## Quality" not in gpu_report.read_text()
    runs = [make_run("hf", 0, eval=eval_dict(0.6, tt_target=40.0)),
            make_run("hf", 1, eval=eval_dict(0.7, tt_target=50.0)),
            make_run("tunebench", 0, tokens_per_s=1500, eval=eval_dict(0.65, tt_target=None)),
            make_run("trl", 0, eval=eval_dict(0.0, status="error")),
            make_run("litgpt", 0, eval={"status": "ok"})]  # tolerant to missing keys
    d = make_sweep(tmp_path / "q", runs)
    out = tmp_path / "rep2"
    md = write_report(d, out).read_text()
    q = _section(md, "Quality")
    hf = _table_row(q, "hf")
    header = _table_row(q, "framework")
    assert float(dict(zip(header, hf, strict=True))["arith/acc"]) == pytest.approx(0.65)
    assert _table_row(q, "untrained model")[header.index("arith/acc")] == "0.2500"
    assert "tunebench not reached" in q and "hf 45 s" in q
    assert "synthetic evaluator failure" in q
    assert (out / "accuracy_vs_tps.png").is_file() and (out / "time_to_target.png").is_file()


def _parity_section(md: str) -> str:
    assert "### Loss parity" in md, "no loss-parity section"
    return md.split("### Loss parity", 1)[1].split("## Environment", 1)[0]


def test_parity_section_compares_every_ok_run(gpu_report):
    """Every ok run of the GPU sweep has the same loss curve as hf's: one "ok" row each, failed runs left out."""
    sec = _parity_section(gpu_report.read_text())
    header = _table_row(sec, "framework")
    assert header == ["framework", "repeat", "max_abs_diff", "mean_abs_diff", "tolerance", "first_departure_step",
                      "parity_status"]
    rows = [c for line in sec.splitlines() if line.startswith("| ") and (c := [x.strip() for x in
                                                                            line.strip("|").split("|")]) != header]
    assert sorted((r[0].strip("*"), r[1]) for r in rows) == [(fw, rep) for fw in ("hf", "trl", "tunebench")
                                                             for rep in ("0", "1")]
    for r in rows:
        cells = dict(zip(header, r, strict=True))
        assert cells["parity_status"] == "ok" and cells["max_abs_diff"] == "0.0000", r
        assert cells["first_departure_step"] == "—"


def test_foreign_gpu_processes_warned(tmp_path):
    env = environment_dict("cuda", foreign=[{"gpu": 0, "pid": 4242, "used_gib": 3.5}])
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0)], environment=env)
    md = write_report(d, tmp_path / "rep").read_text()
    assert "Foreign processes were found on the GPU" in md
    assert "pid 4242" in _section(md, "Failures and caveats")


def test_rows_of_two_machines_or_two_commits_are_a_caveat(tmp_path):
    """Rows filled in on another card of the same kind, or from other code, are named with their machine or
    commit; cards are compared only where every run recorded them (else the GPU kind alone)."""
    runs = [make_run(fw, 0) for fw in ("hf", "trl", "tunebench")]
    md = write_report(make_sweep(tmp_path / "same", runs), tmp_path / "r0").read_text()
    assert "rows measured" not in _section(md, "Failures and caveats")
    for r, card in zip(runs, ("GPU-aaaaaaaa-1", "GPU-aaaaaaaa-1", "GPU-bbbbbbbb-2"), strict=True):
        r["environment"] |= {"gpu_uuids": [card]}
    runs[2]["environment"] |= {"git_sha": "fedcba9876543210"}
    caveats = _section(write_report(make_sweep(tmp_path / "two", runs), tmp_path / "r1").read_text(),
                       "Failures and caveats")
    assert ("rows measured on 2 machines (NVIDIA H100 80GB HBM3 x1 (card aaaaaaaa): hf r0, trl r0; NVIDIA H100 80GB "
            "HBM3 x1 (card bbbbbbbb): tunebench r0)") in caveats
    assert "rows measured from 2 commits (0123456: hf r0, trl r0; fedcba9: tunebench r0)" in caveats
    del runs[0]["environment"]["gpu_uuids"]  # stored before cards were recorded: one kind, one machine
    caveats = _section(write_report(make_sweep(tmp_path / "old", runs), tmp_path / "r2").read_text(),
                       "Failures and caveats")
    assert "machines" not in caveats and "2 commits" in caveats


def test_how_each_framework_ran_shows_adapter_notes(tmp_path):
    uns = make_run("unsloth", 0)
    uns["native_config"] = "/w/native/unsloth.json"
    uns["extra"] = {"rerun": "python -m adapters_for_tools.unsloth.rerun /w/native/unsloth.json",
                    "data": "BOS text written at the start of every sample", "differences": ["alpaca: note A"]}
    tb = make_run("tunebench", 0)
    tb["extra"] = {"trainer": {"overrides": {"recompute_layers": 4}}}
    sweep = make_sweep(tmp_path / "results" / "notes-20260101-000000", [make_run("hf", 0), uns, tb])
    md = write_report(sweep, tmp_path / "rep").read_text()
    sec = _section(md, "How each framework was run")
    row = _table_row(sec, "unsloth")
    assert row[1] == "unsloth.json" and "adapters_for_tools.unsloth.rerun" in row[2]
    assert "BOS text written" in row[3] and "alpaca: note A" in row[3]
    assert "recompute_layers=4" in _table_row(sec, "tunebench")[3]
    assert _table_row(sec, "hf")[1:] == ["—", "—", "—"]


def test_how_each_framework_ran_names_a_trainer_class_stored_either_way(tmp_path):
    old, new = make_run("unsloth", 0), make_run("trl", 0)
    old["extra"] = {"trainer": "UnslothDPOTrainer.UnslothDPOTrainer"}  # a class name where tunebench keeps a dict
    new["extra"] = {"trainer_class": "trl.DPOTrainer"}
    sweep = make_sweep(tmp_path / "results" / "pref-20260101-000000", [old, new])
    sec = _section(write_report(sweep, tmp_path / "rep").read_text(), "How each framework was run")
    assert "trainer: UnslothDPOTrainer.UnslothDPOTrainer" in _table_row(sec, "unsloth")[3]
    assert "trainer: trl.DPOTrainer" in _table_row(sec, "trl")[3]


def test_default_out_dir():
    assert default_out_dir(Path("/x/proj/results/run-1")) == Path("/x/proj/reports/run-1")
    assert default_out_dir(Path("/x/elsewhere/run-1")) == Path("/x/elsewhere/run-1/report")


def test_main_exit_codes(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "results" / "one-20260101-000000", [make_run("hf", 0)])
    assert report_cli.main([str(sweep)]) == 0
    assert (tmp_path / "reports" / sweep.name / "report.html").is_file()
    assert report_cli.main([str(sweep), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").is_file()
    assert report_cli.main([str(tmp_path / "missing")]) == 2
    assert "not a results directory" in capsys.readouterr().err


def test_fmt_dash_for_empty():
    assert fmt(None) == "—"
    assert fmt(float("nan")) == "—"
    import pandas as pd

    assert fmt(pd.NA) == "—" and is_empty(pd.NA)
    assert fmt(0.0) == "0.00"
    assert fmt(0.1234, 1, pct=True) == "12.3%"
    assert fmt(12345.6, thousands=True) == "12,346"


def test_parity_departures_and_transients_flagged(tmp_path):
    """A curve apart from the start departs; a spike that settles again is transient; both are caveats."""
    spiky = make_run("trl", 0, steps=40)
    for s in spiky["steps"][20:26]:  # steps 21-26 parted by 0.3 (bf16 tolerance ~0.1 here), then agree again
        s["loss"] += 0.3
    runs = [make_run("hf", 0, steps=40), make_run("tunebench", 0, steps=40, loss0=3.0), spiky,
            make_run("axolotl", 0, status="error")]
    md = write_report(make_sweep(tmp_path / "sw", runs), tmp_path / "rep").read_text()
    sec = _parity_section(md)
    tb, trl, hf = _table_row(sec, "tunebench"), _table_row(sec, "trl"), _table_row(sec, "hf")
    assert tb[-1] == "**DEPARTS**" and tb[-2] == "1" and tb[2] == "1.0000"
    assert trl[-1] == "⚠ transient" and trl[-2] == "21" and trl[2] == "0.3000"
    assert hf[-1] == "ok" and hf[-2] == "—"
    assert "axolotl" not in sec  # only ok runs have a curve to compare
    caveats = _section(md, "Failures and caveats")
    assert "tunebench r0: loss curve departs from hf from step 1 (max \\|Δ\\| 1.0000 > tolerance 0.1" in caveats
    assert "trl r0: loss curve parted for a while from (transient, then agreed again) hf from step 21" in caveats


def test_run_warnings_are_caveats_and_throttling_follows_the_recorded_reasons(tmp_path):
    hf, trl = make_run("hf", 0), make_run("trl", 0)
    hf["warnings"] = ["1 other process(es) used the GPU during the run: pid 7 (2.0 GiB)"]
    # stored by a worker that still counted the software power cap as throttling: warning text and flag
    trl["warnings"] = ["GPU throttled while measuring: gpu_idle, sw_power_cap"]
    trl["metrics"] |= {"throttled": True, "throttle_reasons_seen": ["gpu_idle", "sw_power_cap"]}
    md = write_report(make_sweep(tmp_path / "sw", [hf, trl]), tmp_path / "rep").read_text()
    caveats = _section(md, "Failures and caveats")
    assert "hf r0: 1 other process(es) used the GPU during the run: pid 7 (2.0 GiB)" in caveats
    assert "throttled" not in caveats


def test_knob_variables_recorded_and_reported(tmp_path, monkeypatch):
    from harness.measuring import environment

    monkeypatch.setenv("TUNEBENCH_NF4_DEQUANT", '{"flat": true}')
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    got = environment.capture(with_torch=False)["variables"]
    assert got["TUNEBENCH_NF4_DEQUANT"] == '{"flat": true}' and got["TRITON_INTERPRET"] == "1"
    assert "UNRELATED_SETTING" not in got and list(got) == sorted(got)
    # the report shows the runs' variables; results from before they were recorded have no such row
    runs = [make_run("hf", 0, device="cpu")]
    runs[0]["environment"]["variables"] = {"TUNEBENCH_NF4_DEQUANT": '{"flat": true}'}
    md = write_report(make_sweep(tmp_path / "results" / "a-20260101-000000", runs), tmp_path / "a").read_text()
    row = _table_row(_section(md, "Environment"), "environment variables (knobs)")
    assert row[1] == '`TUNEBENCH_NF4_DEQUANT={"flat": true}`'
    md = write_report(make_sweep(tmp_path / "results" / "b-20260101-000000", [make_run("hf", 0, device="cpu")]),
                             tmp_path / "b").read_text()
    assert "environment variables" not in md


def test_unreadable_run_file_is_skipped_and_named(tmp_path, capsys):
    """A truncated run file no longer refuses the whole sweep: the rest reports, the file is named twice."""
    d = make_sweep(tmp_path / "results" / "t-20260101-000000", [make_run("hf", 0), make_run("tunebench", 0)])
    bad = d / "runs" / "trl-r0.json"
    bad.write_text('{"scenario": "synthetic-tiny", "framework": "trl", "repeat": 0, "sta')
    assert report_cli.main([str(d), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {bad}: not valid JSON" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Stored files that could not be read, in whole or in part, are left out: `trl-r0.json`" in md
    assert f"skipped, could not be read: {bad}" in _section(md, "Failures and caveats")
    assert _table_row(_section(md, "Comparison"), "tunebench")[2] == "1/1"


HOSTILE = {
    "empty runs/": lambda d: [p.unlink() for p in (d / "runs").glob("*.json")],
    "a run file that is a list": lambda d: (d / "runs" / "hf-r0.json").write_text("[1, 2]"),
    "binary garbage": lambda d: (d / "runs" / "hf-r0.json").write_bytes(bytes(range(256)) * 8),
    "sweep.json missing": lambda d: (d / "sweep.json").unlink(),
    "scenario.yaml not YAML": lambda d: (d / "scenario.yaml").write_text("model: [unclosed\n  - : :"),
    "scenario.yaml of another shape": lambda d: (d / "scenario.yaml").write_text("frameworks: 3\nmeasure: [1]\n"),
    "environment.json a list": lambda d: (d / "environment.json").write_text("[]"),
    "sweep.json planned not a list": lambda d: (d / "sweep.json").write_text('{"planned": {"a": 1}}'),
    "a directory named like a run": lambda d: (d / "runs" / "trl-r0.json").mkdir(),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_result_folders_never_traceback(tmp_path, capsys, case):
    """report and compare on damaged sweeps: a report (or a clear exit 2), never a traceback."""
    from harness.cli import compare as compare_cli

    good = make_sweep(tmp_path / "good", [make_run("hf", r) for r in range(3)])
    d = make_sweep(tmp_path / "results" / "h-20260101-000000", [make_run("hf", r) for r in range(3)])
    HOSTILE[case](d)
    assert report_cli.main([str(d), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert compare_cli.main([str(good), str(d)]) in (0, 1, 2, 3)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    if case in ("a run file that is a list", "binary garbage"):
        assert f"warning: skipped {d / 'runs' / 'hf-r0.json'}" in out.err


def test_not_a_results_folder_and_unexpected_errors_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    assert report_cli.main([str(tmp_path / "plain"), "--out", str(tmp_path / "o")]) == 2
    assert "not a results directory" in capsys.readouterr().err
    d = make_sweep(tmp_path / "sw", [make_run("hf", 0)])

    def boom(*_a, **_k):
        raise KeyError("a shape nothing foresaw")

    monkeypatch.setattr(report_cli, "write_sweep_report", boom)
    assert report_cli.main([str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: {d}: cannot report on what it stores: KeyError" in err and "Traceback" not in err


def test_sweep_without_finished_rows_says_so(tmp_path):
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    md = write_report(empty, tmp_path / "r1").read_text()
    assert "No run is stored: the sweep stopped before any run finished" in md
    assert "no run is stored: nothing was measured" in _section(md, "Failures and caveats")
    assert "every planned run finished ok" not in md
    runs = [make_run("hf", 0, status="error", reason="ValueError: synthetic"),
            make_run("tunebench", 0, status="crashed", with_metrics=False)]
    md = write_report(make_sweep(tmp_path / "failed", runs), tmp_path / "r2").read_text()
    assert "No run finished ok (1 error, 1 crashed): there are no figures to compare" in md
    assert "No framework qualifies for a ranking" in md


def test_report_files_are_world_readable(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        md = write_report(make_sweep(tmp_path / "sw", [make_run("hf", 0)]), tmp_path / "rep")
    finally:
        os.umask(old)
    for name in ("report.md", "report.html", "throughput.png"):
        assert stat.S_IMODE((md.parent / name).stat().st_mode) == 0o644, name


def test_diverged_and_invalid_runs_are_never_ranked(tmp_path):
    """The fastest-looking rows are an invalid one and a diverged one; neither is ranked, both say why."""
    diverged = make_run("unsloth", 0, tokens_per_s=5000, status="ok")
    for s in diverged["steps"][3:]:
        s["loss"] = float("nan")
    diverged |= {"status": "diverged", "valid": False, "reason": "loss is nan at step 4 (7 of 10 recorded losses "
                                                                  "not finite)"}
    runs = [make_run("hf", 0, tokens_per_s=1000, vram_gib=10.0),
            make_run("tunebench", 0, tokens_per_s=1500, vram_gib=9.0),
            make_run("trl", 0, tokens_per_s=4000, vram_gib=4.0, invalid_reasons=[INVALID]), diverged,
            make_run("axolotl", 0, tokens_per_s=3000, vram_gib=2.0, loss0=3.0)]
    md = write_report(make_sweep(tmp_path / "sw", runs), tmp_path / "rep").read_text()
    comp = _section(md, "Comparison")
    assert "**Fastest:** tunebench (1,501 tokens/s, 1.50x hf). **Leanest:** tunebench (9.00 GiB NVML" in comp
    assert ("Not ranked: trl (INVALID settings); unsloth (diverged: loss not finite); axolotl (loss curve departs "
            "from hf)") in comp
    assert "diverged: loss is nan at step 4" in _table_row(comp, "unsloth")[1]
    par = _parity_section(md)
    uns = _table_row(par, "unsloth")
    assert uns[-1] == "**DEPARTS**" and uns[-2] == "4" and uns[2] == "inf"
    assert "unsloth r0: loss curve departs from hf from step 4 (a loss is NaN or infinite)" in _section(
        md, "Failures and caveats")


def _telemetry_run(framework: str, jpt: float | None, throttled: bool = False, warn: bool = True) -> dict:
    run = make_run(framework, 0)
    reading = {"sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "power_w": 450.0, "power_limit_w": 700.0,
               "temperature_c": 55, "throttle_reasons": []}
    reasons = ["hw_thermal_slowdown", "sw_power_cap"] if throttled else ["sw_power_cap"]
    run["metrics"] |= {"energy_j": None if jpt is None else jpt * 8192, "joules_per_token": jpt,
                       "avg_power_w": None if jpt is None else 480.0, "throttled": throttled,
                       "throttle_reasons_seen": reasons,
                       "telemetry": {"start": reading, "peak_power": reading | {"power_w": 690.0, "temperature_c": 71},
                                     "end": reading}}
    if throttled and warn:
        run["warnings"] = [f"GPU throttled while measuring: {', '.join(reasons)}"]
    return run


def test_energy_columns_telemetry_and_throttling(tmp_path, gpu_report):
    assert "J/token" not in gpu_report.read_text()  # no run measured energy: no column, no telemetry section
    assert "## GPU telemetry" not in gpu_report.read_text()
    runs = [_telemetry_run("hf", 0.0625), _telemetry_run("tunebench", None, throttled=True, warn=False),
            make_run("trl", 0)]
    md = write_report(make_sweep(tmp_path / "sw", runs), tmp_path / "rep").read_text()
    comp = _section(md, "Comparison")
    header = _table_row(comp, "framework")
    assert header[header.index("MFU") + 1: header.index("MFU") + 3] == ["J/token", "avg power (W)"]
    cells = {fw: dict(zip(header, _table_row(comp, fw), strict=True)) for fw in ("hf", "tunebench", "trl")}
    assert cells["hf"]["J/token"] == "0.0625" and cells["hf"]["avg power (W)"] == "480"
    assert cells["trl"]["J/token"] == "—" and cells["tunebench"]["avg power (W)"] == "—"
    assert cells["tunebench"]["status"] == "⚠ ok, throttled: r0 (hw_thermal_slowdown, sw_power_cap)"
    assert cells["hf"]["status"] == "ok"  # power-capped only: what every loaded H200 reports
    tel = md.split("### GPU telemetry\n", 1)[1].split("\n#", 1)[0]
    row = _table_row(tel, "hf")
    assert row[2:6] == ["1980 / 1980 / 1980", "450 / 690 / 450", "700", "55 / 71 / 55"]
    assert _table_row(tel, "tunebench")[6] == "⚠ THROTTLED: hw_thermal_slowdown, sw_power_cap"
    assert _table_row(tel, "hf")[6] == "sw_power_cap"
    with pytest.raises(AssertionError):
        _table_row(tel, "trl")  # no telemetry recorded: no row
    caveats = _section(md, "Failures and caveats")
    assert ("tunebench r0: GPU throttled while measuring (hw_thermal_slowdown, sw_power_cap): its tokens/s "
            "understate") in caveats
    assert "J/token and avg power: GPU energy from NVML's total-energy counter" in md


def _row_of(tool: str, label: str, repeat: int = 0, *, switches: dict | None = None,
            overrides: dict | None = None, **kw) -> dict:
    """A run of ``tool`` stored under the row label ``label``: one of the tool's variant rows."""
    run = make_run(tool, repeat, **kw) | {"framework": label, "log": f"logs/{label}-r{repeat}.log"}
    run |= {"overrides": overrides or {}, "extra": {"switches": switches} if switches else {}}
    return run


@pytest.fixture(scope="module")
def variants_report(tmp_path_factory) -> str:
    """Several rows per tool: defaults, switch rows, and unfair rows that look best (invalid, loss departing)."""
    tmp_path = tmp_path_factory.mktemp("variants")
    runs = [make_run("hf", 0, tokens_per_s=1000, vram_gib=10.0),
            _row_of("hf", "hf-liger", tokens_per_s=1150, vram_gib=7.0, overrides={"liger": True},
                    switches={"liger_kernel": True}),
            make_run("unsloth", 0, tokens_per_s=1400, vram_gib=6.0),
            _row_of("unsloth", "unsloth-plain-ckpt", tokens_per_s=1600, vram_gib=9.0,
                    overrides={"use_gradient_checkpointing": True}, switches={"unsloth_gradient_checkpointing": True}),
            _row_of("unsloth", "unsloth-broken", tokens_per_s=5000, vram_gib=1.0,
                    invalid_reasons=["liger_kernel: asked for True, not read back from the live run"]),
            make_run("tunebench", 0, tokens_per_s=2000, vram_gib=8.0),
            _row_of("tunebench", "tunebench-lean", tokens_per_s=1500, vram_gib=5.0,
                    overrides={"offload_embeddings": True}),  # no switch read back: its row as written
            _row_of("tunebench", "tunebench-odd", tokens_per_s=9000, vram_gib=2.0, loss0=3.0,
                    overrides={"recompute_layers": 1}),
            make_run("trl", 0, tokens_per_s=950, vram_gib=9.5)]
    return write_report(make_sweep(tmp_path / "results" / "variants-20260101-000000", runs),
                        tmp_path / "rep").read_text()


def test_each_tool_marks_its_fastest_and_leanest_fair_row(variants_report):
    comp = _section(variants_report, "Comparison")
    header = _table_row(comp, "framework")
    assert header[-1] == "best of tool"
    best = {fw: _table_row(comp, fw)[-1] for fw in ("hf", "hf-liger", "unsloth", "unsloth-plain-ckpt",
                                                     "unsloth-broken", "tunebench", "tunebench-lean", "tunebench-odd",
                                                     "trl")}
    assert best == {"hf": "—", "hf-liger": "fastest, leanest", "unsloth": "leanest", "unsloth-plain-ckpt": "fastest",
                    "unsloth-broken": "—", "tunebench": "fastest", "tunebench-lean": "leanest", "tunebench-odd": "—",
                    "trl": "—"}  # trl ran one row: nothing to choose between


def test_each_tool_at_its_best_table(variants_report):
    sec = variants_report.split("### Each tool at its best\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    head = _table_row(sec, "tool")
    rows = {t: dict(zip(head, _table_row(sec, t), strict=True)) for t in ("hf", "unsloth", "tunebench", "trl")}
    assert rows["hf"]["fastest row"] == "hf-liger" and rows["hf"]["leanest row"] == "hf-liger"
    assert rows["hf"]["its switches"] == "liger_kernel=true"
    u = rows["unsloth"]
    assert (u["fastest row"], u["leanest row"]) == ("unsloth-plain-ckpt", "unsloth")
    assert u["peak memory (GiB)"] == "6.00 (NVML per-process)"
    assert "unsloth-broken (INVALID settings)" in u["rows left out"]
    assert float(u["tokens/s"].replace(",", "")) == pytest.approx(1600, rel=0.02)
    tb = rows["tunebench"]
    assert tb["fastest row"] == "tunebench" and tb["its switches"] == "default"
    assert tb["leanest row"] == "tunebench-lean"
    assert tb["the leanest row's switches"] == "offload_embeddings=true (as written)"
    assert tb["rows left out"] == "tunebench-odd (loss curve departs from hf)"
    assert rows["trl"]["fastest row"] == "trl" and rows["trl"]["rows left out"] == "—"
    # the overall ranking keeps its own rules: the unfair rows are not ranked there either
    assert "**Fastest:** tunebench (" in _section(variants_report, "Comparison")


def test_one_row_per_tool_has_no_best_of_tool_marks(gpu_report):
    md = gpu_report.read_text()
    assert "best of tool" not in md and "Each tool at its best" not in md
    assert "Claimed vs measured" not in md  # the synthetic scenario is named by no published claim
