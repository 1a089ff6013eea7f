"""Run a scenario's first framework row in-process through the harness worker, as the runner's subprocess would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.running.prepare import prepare
from harness.running.worker import run_spec


def run_first_row(sc, tmp_path: Path) -> dict[str, Any]:  # noqa: ANN001
    """Prepare the scenario's inputs under ``tmp_path`` and run its first framework row; the result must be ok and
    valid (asserted with the traceback / invalid reasons as the message)."""
    prepared = prepare(sc, tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    fw = sc.frameworks[0]
    res = run_spec({"scenario": sc.to_dict(), "framework": fw.name, "overrides": fw.overrides,
                    "repeat": 0, "checkpoint": prepared["checkpoint"], "dataset_path": prepared["dataset_path"],
                    "work_dir": str(work)})
    assert res["status"] == "ok", res.get("traceback")
    assert res["valid"], res["invalid_reasons"]
    return res
