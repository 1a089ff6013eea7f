"""The frontier's report: tunebench's longest context against the best peer's per budget, the long-context claims
checked on the cells, and the report written from a real (dummy-tool) frontier folder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.analysis.frontier import Cell
from harness.cli import frontier as frontier_cli
from harness.cli import report as report_cli
from harness.reporting.claims import Claim
from harness.reporting.document import Doc
from harness.reporting.frontier import _ours_against_peers, _planner, _uncapped, measure_context


def _cell(fw, tool, budget, value, state="found", tps=1000.0):
    return Cell(fw, tool, budget, "seq_len", value, state, measured=value is not None, tokens_per_s=tps,
                valid=True, next_oom_value=None if value is None else value + 256)


CLAIM = dict(id="c", text="t", source="s", setting="x", metric="max_context", row="unsloth", against="hf",
             at_least=12.0, reading="r", scenarios=["fr"], budget_gib=80)


def test_tunebench_against_the_best_peer_per_budget_marks_the_target():
    cells = [_cell("hf", "hf", 8, 1024), _cell("unsloth", "unsloth", 8, 4096),
             _cell("tunebench", "tunebench", 8, 2048), _cell("tunebench-planned", "tunebench", 8, 8192),
             _cell("hf", "hf", 16, 2048), _cell("unsloth", "unsloth", 16, 8192),
             _cell("tunebench", "tunebench", 16, 10240), _cell("tunebench-planned", "tunebench", 16, 9216),
             _cell("hf", "hf", 24, None, "none fits"), _cell("unsloth", "unsloth", 24, None, "none fits"),
             _cell("tunebench", "tunebench", 24, 512)]
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (header, rows)), = [b for b in doc.blocks if b[0] == "table"]
    by = {r[0]: r for r in rows}
    assert by["8"][1:3] == ["tunebench-planned", "8,192"] and by["8"][4:6] == ["unsloth", "4,096"]
    assert by["8"][-1].text == "2.00x" and by["8"][-1].mark == "good"  # 8,192 / 4,096 >= 1.5
    assert by["16"][1] == "tunebench" and by["16"][-1].text == "1.25x" and by["16"][-1].mark == "bad"
    assert by["24"][-1].mark == "good" and "no peer row trains" in by["24"][-1].text

    # an interrupted frontier: a peer's search still open, or not begun, gives no verdict yet
    cells[1] = _cell("unsloth", "unsloth", 8, 4096, "incomplete")
    cells[8:10] = [_cell("hf", "hf", 24, None, "not probed"), _cell("unsloth", "unsloth", 24, None, "not probed")]
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (header, rows)), = [b for b in doc.blocks if b[0] == "table"]
    by = {r[0]: r for r in rows}
    assert by["8"][5] == "≥ 4,096" and by["8"][-1].mark == "good"
    # unsloth's search is open, but it ran out of memory at 4,352: its answer lies below, whatever it closes at
    assert by["8"][-1].text == "at least 1.88x, whatever the open peer searches close at (unsloth out of memory at " \
        "4,352)"
    assert by["24"][-1].text == "open (peer searches not closed: hf, unsloth)" and by["24"][-1].mark == "warn"
    for oom, text in ((None, "2.00x, not final (peer searches not closed: unsloth)"),  # nothing bounds it yet
                      (6144, "2.00x, not final (peer searches not closed: unsloth)")):  # 8,192 / 6,144 < 1.5
        cells[1].next_oom_value = oom
        doc = Doc("t")
        _ours_against_peers(doc, cells, "seq_len")
        (_, (header, rows)), = [b for b in doc.blocks if b[0] == "table"]
        assert {r[0]: r for r in rows}["8"][-1].text == text

    # closed searches whose answers are search probes' (shortened or shared), not yet run alone: no verdict either
    cells[1] = _cell("unsloth", "unsloth", 8, 4096)
    cells[3].measured = False
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (header, rows)), = [b for b in doc.blocks if b[0] == "table"]
    by = {r[0]: r for r in rows}
    assert by["8"][-1].text == "2.00x, not final (not yet run alone: tunebench-planned)" and by["8"][-1].mark == "warn"

    # a search of ours still open can only raise ours: a ratio already at the target is final as a lower bound
    cells[3].measured = True
    cells[2] = _cell("tunebench", "tunebench", 8, 2048, "incomplete")
    cells[6] = _cell("tunebench", "tunebench", 16, 10240, "incomplete")
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (header, rows)), = [b for b in doc.blocks if b[0] == "table"]
    by = {r[0]: r for r in rows}
    assert by["8"][-1].text == "at least 2.00x (tunebench searches not closed)" and by["8"][-1].mark == "good"
    assert by["16"][-1].text == "1.25x, not final (tunebench searches not closed: tunebench)"


def test_many_open_peer_searches_bound_the_ratio_by_their_largest_value_out_of_memory():
    cells = [_cell("tunebench-planned", "tunebench", 24, 131072)] + \
        [_cell(fw, fw, 24, v, "incomplete") for fw, v in (("hf", 4096), ("trl", 10240), ("unsloth", 37888),
                                                         ("axolotl", 2048))]
    cells[3].next_oom_value = 51200
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (_, rows)), = [b for b in doc.blocks if b[0] == "table"]
    assert rows[0][-1].text == "at least 2.56x, whatever the open peer searches close at (4 rows, each out of " \
        "memory at 51,200 or less)"
    cells[4].next_oom_value = None  # axolotl: nothing out of memory yet, so nothing bounds it
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (_, rows)), = [b for b in doc.blocks if b[0] == "table"]
    assert rows[0][-1].text.startswith("3.46x, not final (peer searches not closed: 4 rows")


@pytest.mark.parametrize("ours, peer, text, mark", [
    (131072, 65536, "at least 2.00x (tunebench trains the grid's top)", "good"),
    (131072, 98304, "at least 1.33x (tunebench trains the grid's top)", "warn"),  # below the target: a bound only
    (131072, 131072, "no ratio: unsloth trains the grid's top (131,072)", "warn"),
    (98304, 131072, "no ratio: unsloth trains the grid's top (131,072)", "warn"),
    (98304, 65536, "1.50x", "good"),
])
def test_a_row_at_the_grids_top_bounds_the_ratio_from_one_side(ours, peer, text, mark):
    cells = [_cell("tunebench", "tunebench", 80, ours), _cell("unsloth", "unsloth", 80, peer)]
    for c in cells:
        if c.value == 131072:
            c.next_oom_value = None  # nothing above the grid's top was tried
    doc = Doc("t")
    _ours_against_peers(doc, cells, "seq_len")
    (_, (_, rows)), = [b for b in doc.blocks if b[0] == "table"]
    assert (rows[0][-1].text, rows[0][-1].mark) == (text, mark)


@pytest.mark.parametrize("row, against, verdict, text", [
    (40960, 2048, "holds", "20.00x (40,960 vs 2,048)"),
    (8192, 2048, "does not hold", "4.00x (8,192 vs 2,048)"),
    (4096, None, "holds", "4,096 vs none (hf out of memory at"),
])
def test_a_long_context_claim_is_the_ratio_of_the_two_rows_longest_values_under_its_budget(row, against, verdict,
                                                                                           text):
    c = Claim(**CLAIM)
    cells = [_cell("unsloth", "unsloth", 80, row),
             _cell("hf", "hf", 80, against, "found" if against else "none fits")]
    cells[1].next_oom_value = 8
    measured, cell = measure_context(c, cells)
    assert cell.text == verdict and measured.startswith(text)


def test_a_long_context_claim_is_not_measured_without_a_closed_cell_under_its_budget():
    c = Claim(**CLAIM)
    measured, cell = measure_context(c, [_cell("unsloth", "unsloth", 40, 4096), _cell("hf", "hf", 40, 512)])
    assert "no `unsloth` cell under 80 GiB" in cell.text and cell.mark == "warn"
    _, cell = measure_context(c, [_cell("unsloth", "unsloth", 80, 4096, "incomplete"), _cell("hf", "hf", 80, 512)])
    assert "had not closed" in cell.text
    top = _cell("unsloth", "unsloth", 80, 4096)
    top.next_oom_value = None  # the grid's top: nothing above it tried
    text, cell = measure_context(c, [top, _cell("hf", "hf", 80, 512)])
    assert "trains the grid's top (4,096), so the ratio is at least 8.00x" in cell.text and cell.mark == "warn"
    assert measure_context(c, [top, _cell("hf", "hf", 80, 256)])[1].text == "holds"  # 16x: holds already
    _, cell = measure_context(c, [top, top.__class__(**{**vars(top), "framework": "hf", "tool": "hf"})])
    assert "`hf` trains the grid's top" in cell.text
    searched = _cell("hf", "hf", 80, 512)
    searched.measured = False  # found by shortened or shared search probes only
    _, cell = measure_context(c, [_cell("unsloth", "unsloth", 80, 8192), searched])
    assert "`hf`'s 512 under 80 GiB is a search probe's answer" in cell.text and cell.mark == "warn"
    with pytest.raises(ValueError, match="budget_gib goes with metric max_context"):
        Claim(**{**CLAIM, "budget_gib": None})
    with pytest.raises(ValueError, match="budget_gib goes with metric max_context"):
        Claim(**{**CLAIM, "metric": "tokens_per_s"})


def _dummy_frontier(tmp_path, rows="", only=()):  # noqa: ANN001, ANN202
    """A frontier of the dummy tool over micro-batch 1-4 under 0.5 and 1 GiB (its need: 1/64 GiB a token), with the
    scenario's other ``rows`` (YAML list items) and ``--only``; its folder."""
    scenario = tmp_path / "fr.yaml"
    scenario.write_text(
        "version: 1\nname: fr\nmodel: {preset: tiny-llama, dtype: float32}\nmethod: {kind: lora, lora_r: 4}\n"
        "data: {seq_len: 16, lengths: fixed}\ntrain: {micro_batch: 1, steps: 2, warmup_steps: 1}\n"
        "hardware: {device: cpu}\nmeasure: {timeout_s: 120, baseline: d-sim}\nframeworks:\n"
        "  - {name: dummy, label: d-sim, overrides: {sim_gib_per_token: 0.015625}}\n" + rows)
    assert frontier_cli.main([str(scenario), "--vary", "micro_batch", "--budgets", "0.5,1", "--max", "4",
                              "--results", str(tmp_path / "results"), "--quiet",
                              *(["--only", *only] if only else [])]) == 0
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    return folder


def test_a_frontier_writes_its_report_beside_the_results_and_report_rebuilds_it(tmp_path, env, capsys):
    folder = _dummy_frontier(tmp_path)
    report = tmp_path / "reports" / folder.name
    md = (report / "report.md").read_text()
    assert "| d-sim | 2 (" in md and "| 4 (" in md and (report / "frontier.png").stat().st_size > 0
    assert "data:image/png;base64," in (report / "report.html").read_text()
    (report / "report.md").unlink()
    table = (folder / "frontier.md").read_text()
    (folder / "frontier.md").unlink()  # as a frontier stopped before its end leaves it: no table of its last probes
    assert report_cli.main([str(folder), "--out", str(report)]) == 0
    assert (report / "report.md").read_text() == md
    assert (folder / "frontier.md").read_text() == table


def test_a_row_of_the_scenario_left_out_of_the_frontier_is_not_probed_at_every_budget(tmp_path, env):
    """A frontier run with ``--only`` has tried some of its scenario's rows: the others are in its table as not
    probed, under their own tool, so a verdict against the best peer stays open until they are searched."""
    from harness.analysis.frontier import frontier_cells

    folder = _dummy_frontier(tmp_path, "  - {name: dummy, label: d-other, overrides: {sim_gib_per_token: 0.01}}\n",
                             only=("d-sim",))
    cells = {(c.framework, c.budget_gib): c for c in frontier_cells(folder)}
    assert [fw for fw, b in cells if b == 0.5] == ["d-sim", "d-other"]
    assert cells[("d-sim", 1.0)].state == "found" and cells[("d-sim", 1.0)].value == 4
    for b in (0.5, 1.0):
        assert (cells[("d-other", b)].state, cells[("d-other", b)].tool, cells[("d-other", b)].probes) == \
            ("not probed", "dummy", 0)
    assert "| d-other | not probed | not probed |" in (folder / "frontier.md").read_text()
    # a row added to the scenario since: the same frontier resumes (the probes are done) and names it too
    scenario = tmp_path / "fr.yaml"
    new_row = "  - {name: dummy, label: d-new, overrides: {sim_gib_per_token: 0.02}}\n"
    scenario.write_text(scenario.read_text() + new_row)
    assert frontier_cli.main([str(scenario), "--vary", "micro_batch", "--budgets", "0.5,1", "--max", "4",
                              "--results", str(tmp_path / "results"), "--quiet", "--only", "d-sim"]) == 0
    assert list((tmp_path / "results").glob("fr-frontier-*")) == [folder]
    assert [c.framework for c in frontier_cells(folder) if c.budget_gib == 1.0] == ["d-sim", "d-other", "d-new"]
    assert "| d-new | not probed | not probed |" in (folder / "frontier.md").read_text()


def test_a_budget_beyond_the_gpu_is_said_to_cap_nothing():
    """An 80 GiB column on an 80 GB H100 (79.6 GiB): the worker runs those probes on the whole card, and the report
    says so; budgets under the card's memory get no such line."""
    def probe(name: str, gib: float) -> SimpleNamespace:
        return SimpleNamespace(run=SimpleNamespace(environment=SimpleNamespace(gpu_name=name, gpu_memory_gib=gib)))

    h100 = [probe("NVIDIA H100 80GB HBM3", 79.6474609375)] * 2
    doc = Doc("t")
    _uncapped(doc, [8.0, 40.0, 80.0], h100)
    assert "80 GiB: at least the GPU's 79.6 GiB (NVIDIA H100 80GB HBM3), so no cap" in doc.to_markdown()
    assert "40 GiB" not in doc.to_markdown()
    for budgets, probes in (([8.0, 40.0, 80.0], [probe("NVIDIA H200", 139.8)]), ([8.0, 80.0], [])):
        quiet = Doc("t")
        _uncapped(quiet, budgets, probes)
        assert "no cap" not in quiet.to_markdown()


def test_cells_name_the_commits_their_probes_ran_and_a_mixed_frontier_says_which(tmp_path, env):
    """Each cell records the commits of its probes; where a frontier's probes span commits (a fix between two
    invocations), its table and report list the cells each commit's probes made. One commit: no such list."""
    import json

    from harness.analysis.frontier import MIXED_CODE, frontier_cells, to_markdown

    folder = _dummy_frontier(tmp_path)
    cells = frontier_cells(folder)
    codes = {c.code for c in cells}
    assert len(codes) == 1 and None not in codes and MIXED_CODE not in to_markdown(cells, "t")
    # the probes under 0.5 GiB as if an earlier invocation at another commit had made them
    for f in folder.glob("*.0.5gib.*/runs/*.json"):
        run = json.loads(f.read_text())
        run["environment"] |= {"git_sha": "0123456789abcdef", "git_dirty": False}
        f.write_text(json.dumps(run))
    by = {c.budget_gib: c for c in frontier_cells(folder)}
    assert by[0.5].code == "0123456" and by[1.0].code == codes.pop()
    assert report_cli.main([str(folder), "--out", str(tmp_path / "report")]) == 0
    for text in ((folder / "frontier.md").read_text(), (tmp_path / "report" / "report.md").read_text()):
        assert MIXED_CODE in text and "- 0123456: 0.5 GiB: every row" in text and f"- {by[1.0].code}: 1 GiB" in text


def test_the_report_lists_where_the_planner_predicted_a_fit_that_ran_out_of_memory():
    """Probes of a row that plans itself record the plan and its predicted peak: the report sets the measured peak
    against it where the run trained, and lists every probe predicted within its budget that ran out of memory (a
    plan predicted over the budget, run anyway as the leanest, is no miss; a row that does not plan is left out). A
    run that ran out of memory in a step and went on under a leaner plan is a miss too."""
    def probe(value, status, fits=True, predicted=10.0, peak=None, plan=True, moved=False):  # noqa: ANN001, ANN202
        rec = {"fits": fits, "predicted_peak_alloc_gib": predicted,
               "replanned_after_oom": {"step": 1} if moved else None}
        run = SimpleNamespace(framework="tb-planned", status=status, extra={"trainer": {"plan": rec}} if plan else {},
                              metrics=SimpleNamespace(peak_alloc_gib=peak),
                              environment=SimpleNamespace(code=lambda: "abc1234"))
        return SimpleNamespace(run=run, budget=16.0, value=value)

    probes = [probe(95232, "ok", predicted=12.74, peak=13.76), probe(106496, "ok", predicted=13.69, peak=14.98),
              probe(107520, "oom", predicted=13.78), probe(131072, "oom", fits=False, predicted=17.0),
              probe(8, "oom", plan=False), probe(110592, "ok", predicted=14.0, peak=14.5, moved=True)]
    probes[4].run.extra = {"trainer": "not a mapping"}  # another tool's note under that key: not a plan
    doc = Doc("t")
    _planner(doc, probes, "seq_len")
    md = doc.to_markdown()
    assert "5 probes planned themselves" in md and "2 of those whose plan was predicted within the budget ran out" in md
    assert "+0.50 to +1.29 GiB" in md
    assert "| tb-planned | 16 | 107,520 | **13.78** | stopped | abc1234 |" in md and "131,072" not in md
    assert "| tb-planned | 16 | 110,592 | **14.00** | a leaner plan, ok | abc1234 |" in md
    quiet = Doc("t")
    _planner(quiet, [probe(8, "oom", plan=False)], "seq_len")
    assert "planner" not in quiet.to_markdown()
