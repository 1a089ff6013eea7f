"""A stored sweep loaded once: its runs (typed), resolved scenario, environment and plan.

Reports and the regression gate read sweeps only through :func:`load_sweep`, so both see the same runs in the
same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.storing import results
from harness.storing.schema import Environment, RunResult

DEFAULT_BASELINE = "hf"  # the scenario schema's default for measure.baseline


class NotAResultsDir(ValueError):
    """The path given is not a sweep's results directory (or holds nothing that can be compared)."""


@dataclass
class Sweep:
    """Everything a sweep stored."""

    path: Path
    runs: list[RunResult]
    scenario: dict[str, Any]  # the resolved scenario as stored (scenario.yaml); {} when missing
    environment: Environment  # the machine at sweep start (environment.json)
    plan: dict[str, Any]  # sweep.json; {} when missing

    @property
    def name(self) -> str:
        """The scenario's name (else the plan's, else the directory's)."""
        return self.scenario.get("name") or self.plan.get("scenario") or self.path.name

    @property
    def baseline(self) -> str:
        """The framework speed-ups and loss parity are measured against (``measure.baseline``)."""
        return (self.scenario.get("measure") or {}).get("baseline") or DEFAULT_BASELINE

    @property
    def source(self) -> str | None:
        """The scenario file the sweep was run from."""
        return self.plan.get("scenario_source")

    @property
    def planned(self) -> list[str]:
        """Run keys (``<framework>-r<k>``) the plan lists."""
        return list(self.plan.get("planned") or [])

    def framework_order(self) -> list[str]:
        """Frameworks in scenario order, then any others that have stored runs."""
        names = [f.get("label") or f.get("name") for f in self.scenario.get("frameworks") or [] if isinstance(f, dict)]
        names += [r.framework for r in self.runs]
        return [n for n in dict.fromkeys(names) if n]

    def runs_of(self, framework: str) -> list[RunResult]:
        """Every stored run of one framework, in plan order."""
        return [r for r in self.runs if r.framework == framework]

    def ok_runs(self, framework: str) -> list[RunResult]:
        """The runs of one framework that finished ok (valid or not)."""
        return [r for r in self.runs if r.framework == framework and r.ok]


def is_results_dir(path: Path) -> bool:
    """A sweep directory has a ``runs/`` folder or a ``sweep.json`` plan."""
    path = Path(path)
    return path.is_dir() and ((path / "runs").is_dir() or (path / "sweep.json").is_file())


def load_sweep(results_dir: Path) -> Sweep:
    """Load a stored sweep.

    Args:
        results_dir: ``results/<run-id>``.

    Returns:
        The sweep's runs (plan order), resolved scenario, environment and plan (missing files: empty).

    Raises:
        NotAResultsDir: the directory does not exist, holds neither ``runs/`` nor ``sweep.json``, or a stored
            run cannot be read as a run result.
    """
    path = Path(results_dir)
    if not is_results_dir(path):
        raise NotAResultsDir(f"{path}: not a results directory (expected runs/ or sweep.json inside; "
                             "give results/<run-id> as written by `python -m harness run`)")
    try:
        runs = results.load_results(path) if (path / "runs").is_dir() else []
    except results.ResultSchemaError as e:
        raise NotAResultsDir(f"{path}: a stored run cannot be read: {e}") from e
    scenario: dict[str, Any] = {}
    if (path / "scenario.yaml").is_file():
        loaded = yaml.safe_load((path / "scenario.yaml").read_text())
        scenario = loaded if isinstance(loaded, dict) else {}
    try:
        env = Environment.model_validate(results.read_json(path / "environment.json") or {})
    except ValidationError as e:
        raise NotAResultsDir(f"{path / 'environment.json'}: not an environment record: {e}") from e
    return Sweep(path, runs, scenario, env, results.read_json(path / "sweep.json") or {})
