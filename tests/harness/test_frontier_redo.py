"""``frontier --redo-older ROW``: a fix in one tool's code reaches its cells without redoing the other rows; the
probes that older code made stay on record under each probe's ``runs/attempts/``."""

from __future__ import annotations

import json

from harness.cli import frontier as frontier_cli
from harness.cli import guard
from tests.harness.test_frontier import SIM, _scenario

TWO = SIM + "\n  - {name: dummy, label: d-two, overrides: {sim_gib_per_token: 0.03125}}"


def _frontier(path, tmp_path, *extra: str) -> int:  # noqa: ANN001
    return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5", "--max", "3",
                              "--results", str(tmp_path / "results"), "--quiet", *extra])


def test_redo_older_searches_one_row_again_and_keeps_the_others_and_the_old_probes(tmp_path, env, capsys):
    path = _scenario(tmp_path, TWO)
    assert _frontier(path, tmp_path) == 0
    (folder,) = (tmp_path / "results").glob("fr-frontier-*")
    stored = {p: p.read_text() for p in folder.glob("*/runs/*.json")}
    for p, text in stored.items():  # every probe as if an older commit had made it
        run = json.loads(text)
        run["environment"] |= {"git_sha": "0" * 40, "git_dirty": False}
        p.write_text(json.dumps(run))
    capsys.readouterr()
    assert _frontier(path, tmp_path, "--redo-older", "d-nope") == guard.EXIT_BAD_INPUT
    assert "--redo-older ['d-nope']: not among the scenario's frameworks" in capsys.readouterr().err

    assert _frontier(path, tmp_path, "--redo-older", "d-sim") == 0
    out = capsys.readouterr()
    sim = [p for p in stored if ".d-sim." in p.parent.parent.name]
    assert sim and "probes of d-sim made by other code set aside" in out.err
    kept = [p for p in stored if ".d-two." in p.parent.parent.name]
    assert all(json.loads(p.read_text())["environment"]["git_sha"] == "0" * 40 for p in kept)  # untouched
    for p in sim:  # searched again at this code, the old probe kept as an attempt
        assert json.loads(p.read_text())["environment"]["git_sha"] != "0" * 40
        assert json.loads((p.parent / "attempts" / f"{p.stem}.1.json").read_text())["environment"]["git_sha"] \
            == "0" * 40
    assert f"({len(sim)} run now)" in out.out
    assert _frontier(path, tmp_path, "--redo-older", "d-sim") == 0  # the same code again: nothing set aside
    assert "(0 run now)" in capsys.readouterr().out
