"""A frontier folder measured on one kind of GPU is never filled in on another: rerunning the command there starts a
frontier of that machine beside it (its plan untouched), and the first machine's command still resumes its own."""

from __future__ import annotations

import json

from harness.cli import frontier as frontier_cli
from harness.measuring import environment
from tests.harness.test_frontier import SIM, _scenario


def _frontier(path, tmp_path) -> int:  # noqa: ANN001
    return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5", "--max", "3",
                              "--results", str(tmp_path / "results"), "--quiet"])


def test_each_kind_of_gpu_fills_in_its_own_frontier(tmp_path, env, monkeypatch, capsys):
    path = _scenario(tmp_path, SIM)
    real = environment.capture
    monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": "NVIDIA H100", "gpu_count": 1})
    assert _frontier(path, tmp_path) == 0
    (h100,) = (tmp_path / "results").glob("fr-frontier-*")
    first = sorted(p.parent for p in h100.glob("*/environment.json"))[0]
    assert json.loads((first / "environment.json").read_text())["gpu_name"] == "NVIDIA H100"
    kept = {p: p.read_bytes() for p in h100.rglob("*") if p.is_file()}

    monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": "NVIDIA H200", "gpu_count": 1})
    assert _frontier(path, tmp_path) == 0
    assert "cannot be filled in here" not in capsys.readouterr().err
    folders = sorted((tmp_path / "results").glob("fr-frontier-*"))
    assert len(folders) == 2 and {p: p.read_bytes() for p in h100.rglob("*") if p.is_file()} == kept
    (h200,) = [f for f in folders if f != h100]
    assert all(json.loads(p.read_text())["gpu_name"] == "NVIDIA H200" for p in h200.glob("*/environment.json"))

    monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": "NVIDIA H100", "gpu_count": 1})
    assert _frontier(path, tmp_path) == 0  # the H100's own folder, finished: nothing new starts
    assert sorted((tmp_path / "results").glob("fr-frontier-*")) == folders
