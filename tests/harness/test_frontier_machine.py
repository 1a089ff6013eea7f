"""Each kind of GPU fills in its own frontier folder: with folders of two kinds beside each other, the command
resumes the newest of this machine's kind, though another kind's is newer. (With only another kind's it refuses:
test_frontier.py, ``test_a_frontier_of_another_gpu_is_not_filled_in_here``.)"""

from __future__ import annotations

import json

from harness.cli import frontier as frontier_cli
from harness.measuring import environment
from tests.harness.test_frontier import SIM, _scenario


def _frontier(path, tmp_path, *extra: str) -> int:  # noqa: ANN001
    return frontier_cli.main([str(path), "--vary", "micro_batch", "--budgets", "0.5", "--max", "3",
                              "--results", str(tmp_path / "results"), "--quiet", *extra])


def _files(folder) -> dict:  # noqa: ANN001
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_each_kind_of_gpu_fills_in_its_own_frontier(tmp_path, env, monkeypatch, capsys):
    path = _scenario(tmp_path, SIM)
    real = environment.capture

    def on(gpu: str) -> None:
        monkeypatch.setattr(environment, "capture", lambda **kw: real(**kw) | {"gpu_name": gpu, "gpu_count": 1})

    on("NVIDIA H100")
    assert _frontier(path, tmp_path) == 0
    (h100,) = (tmp_path / "results").glob("fr-frontier-*")
    kept = _files(h100)

    on("NVIDIA H200")
    assert _frontier(path, tmp_path, "--new") == 0
    folders = sorted((tmp_path / "results").glob("fr-frontier-*"))
    (h200,) = [f for f in folders if f != h100]
    assert all(json.loads(p.read_text())["gpu_name"] == "NVIDIA H200" for p in h200.glob("*/environment.json"))
    assert _files(h100) == kept

    on("NVIDIA H100")  # the H200's folder is the newer: the H100 still resumes its own
    capsys.readouterr()
    assert _frontier(path, tmp_path) == 0
    assert "cannot be filled in here" not in capsys.readouterr().err
    assert sorted((tmp_path / "results").glob("fr-frontier-*")) == folders
    on("NVIDIA H200")
    assert _frontier(path, tmp_path) == 0
    assert sorted((tmp_path / "results").glob("fr-frontier-*")) == folders
