"""A stored sweep loaded once: its runs (typed), resolved scenario, environment and plan.

Reports and the regression gate read sweeps only through :func:`load_sweep`, so both see the same runs in the
same order. Stored files never block a report: a run file that cannot be read (truncated, not JSON, not a run
result) and a ``scenario.yaml``, ``environment.json`` or ``sweep.json`` that cannot be used are left out and
listed in :attr:`Sweep.unreadable`, each naming the file and why; the commands print them and the report shows
them as caveats. Only a directory that is not a sweep's at all raises :class:`NotAResultsDir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness.spec import yamlsafe
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
    unreadable: list[results.Unreadable] = field(default_factory=list)  # stored files left out, with why

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
    def source_in_repo(self) -> str | None:
        """:attr:`source` from its ``scenarios/`` folder on (``scenarios/llama8b_lora.yaml``), as a reader's checkout
        names it; the stored path as is when it lies in no ``scenarios/`` folder."""
        if not self.source:
            return None
        parts = Path(self.source).parts
        cut = max((i for i, p in enumerate(parts) if p == "scenarios"), default=None)
        return str(Path(*parts[cut:])) if cut is not None else self.source

    @property
    def planned(self) -> list[str]:
        """Run keys (``<framework>-r<k>``) the plan lists."""
        return list(self.plan.get("planned") or [])

    def framework_order(self) -> list[str]:
        """Frameworks in scenario order, then any others that have stored runs."""
        rows = self.scenario.get("frameworks")
        names = [f.get("label") or f.get("name") for f in (rows if isinstance(rows, list) else [])
                 if isinstance(f, dict)]
        names += [r.framework for r in self.runs]
        return [str(n) for n in dict.fromkeys(names) if n]

    def unreadable_runs(self, framework: str) -> list[results.Unreadable]:
        """The unreadable run files whose name (``<framework>-r<k>.json``) says they were ``framework``'s."""
        return [u for u in self.unreadable if u.path.parent.name == "runs"
                and u.path.stem.rpartition("-r")[0] == framework]

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


def _read_mapping(path: Path, kind: str, unreadable: list[results.Unreadable]) -> dict[str, Any]:
    """A stored JSON (``.json``) or YAML mapping, or {} with the reason in ``unreadable`` (absent: {} without a
    word, a sweep that died before writing it)."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        loaded = read_stored_mapping(path)
    except StoredFileError as e:
        unreadable.append(results.Unreadable(path, f"{path}: cannot be read as {kind}: {e}"))
        return {}
    if not isinstance(loaded, dict):
        unreadable.append(results.Unreadable(path, f"{path}: not {kind} (a {type(loaded).__name__}, not a mapping)"))
        return {}
    return loaded


class StoredFileError(ValueError):
    """A stored JSON or YAML file that cannot be read; the message says why (without the file's name)."""


def read_stored_mapping(path: Path) -> Any:
    """The value of a JSON (``.json``) or YAML file the harness stored and reads back, which may since have been
    damaged or replaced by anything: only a regular file is read, JSON by its own parser (YAML 1.1 reads
    json.dumps' "1e-05" as a string), YAML as strictly and boundedly as a scenario (no aliases, bounded size and
    depth: :mod:`harness.spec.yamlsafe`).

    Raises:
        StoredFileError: missing, not a regular file, not UTF-8, not JSON / YAML.
    """
    try:
        if path.suffix == ".json":
            return json.loads(results.read_stored_bytes(path).decode("utf-8"))
        results.read_stored_bytes(path, STORED_YAML_BYTES)  # a FIFO or a device: refused before yamlsafe reads it
        return yamlsafe.load_path(path, STORED_YAML_BYTES)
    except OSError as e:
        raise StoredFileError(e.strerror or str(e)) from None
    except yamlsafe.YamlError as e:
        raise StoredFileError("; ".join(f"line {line}: {reason}" for line, _, reason in e.problems[:3])) from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StoredFileError(" ".join(str(e).split())[:300]) from None


STORED_YAML_BYTES = 1 << 20  # a resolved scenario.yaml is a few KB; its file was at most 256 KiB before defaults


SCENARIO_SECTIONS = ("model", "method", "data", "train", "hardware", "measure", "eval")  # mappings in a scenario
def _check_scenario(path: Path, sc: dict[str, Any], unreadable: list[results.Unreadable]) -> dict[str, Any]:
    """The stored scenario with every part of the wrong shape left out (and named): a top-level section that is no
    mapping, framework rows that are not mappings with text names and labels, a name or baseline that is not text."""
    out = dict(sc)
    for key in SCENARIO_SECTIONS:
        if out.get(key) is not None and not isinstance(out[key], dict):
            unreadable.append(results.Unreadable(path, f"{path}: section {key!r} is not a mapping: ignored"))
            out.pop(key)
    if out.get("name") is not None and not isinstance(out["name"], str):
        unreadable.append(results.Unreadable(path, f"{path}: 'name' is not text: ignored"))
        out.pop("name")
    measure = out.get("measure") or {}
    if measure.get("baseline") is not None and not isinstance(measure["baseline"], str):
        unreadable.append(results.Unreadable(path, f"{path}: 'measure.baseline' is not text: ignored"))
        out["measure"] = {k: v for k, v in measure.items() if k != "baseline"}
    rows = out.get("frameworks")
    if rows is not None and not (isinstance(rows, list) and all(
            isinstance(f, dict) and all(f.get(k) is None or isinstance(f[k], str) for k in ("name", "label"))
            for f in rows)):
        unreadable.append(results.Unreadable(path, f"{path}: 'frameworks' is not a list of rows: ignored"))
        out.pop("frameworks")
    return out


# the plan's keys that are read as text
_PLAN_TEXT = ("scenario", "scenario_hash", "scenario_source", "created")


def _check_plan(path: Path, plan: dict[str, Any], unreadable: list[results.Unreadable]) -> dict[str, Any]:
    """The stored plan without a ``planned`` list, or a text field, of the wrong shape (named in ``unreadable``)."""
    planned = plan.get("planned")
    if planned is not None and not (isinstance(planned, list) and all(isinstance(k, str) for k in planned)):
        unreadable.append(results.Unreadable(path, f"{path}: 'planned' is not a list of run names: ignored"))
        plan = {k: v for k, v in plan.items() if k != "planned"}
    wrong = [k for k in _PLAN_TEXT if plan.get(k) is not None and not isinstance(plan[k], str)]
    if wrong:
        unreadable.append(results.Unreadable(path, f"{path}: {', '.join(wrong)} not text: ignored"))
        plan = {k: v for k, v in plan.items() if k not in wrong}
    return plan


def load_sweep(results_dir: Path) -> Sweep:
    """Load a stored sweep, leaving out (and listing) what cannot be read.

    Args:
        results_dir: ``results/<run-id>``.

    Returns:
        The sweep's readable runs (plan order), resolved scenario, environment and plan (missing files: empty);
        :attr:`Sweep.unreadable` names every stored file left out and why.

    Raises:
        NotAResultsDir: the directory does not exist or holds neither ``runs/`` nor ``sweep.json``.
    """
    path = Path(results_dir)
    if not is_results_dir(path):
        raise NotAResultsDir(f"{path}: not a results directory (expected runs/ or sweep.json inside; "
                             "give results/<run-id> as written by `python -m harness run`)")
    unreadable: list[results.Unreadable] = []
    runs: list[RunResult] = []
    if (path / "runs").exists() and not (path / "runs").is_dir():
        unreadable.append(results.Unreadable(path / "runs", f"{path / 'runs'}: not a folder: no run can be read"))
    if (path / "runs").is_dir():
        try:
            runs, bad = results.read_runs(path)
        except OSError as e:  # runs/ itself cannot be listed
            bad = [results.Unreadable(path / "runs", f"{path / 'runs'}: cannot be listed: {e.strerror or e}")]
        unreadable += bad
    scenario = _check_scenario(path / "scenario.yaml", _read_mapping(path / "scenario.yaml", "a scenario", unreadable),
                               unreadable)
    env_data = _read_mapping(path / "environment.json", "an environment record", unreadable)
    try:
        env = Environment.model_validate(env_data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        unreadable.append(results.Unreadable(path / "environment.json",
                                             f"{path / 'environment.json'}: not an environment record: {problems}"))
        env = Environment()
    plan = _check_plan(path / "sweep.json", _read_mapping(path / "sweep.json", "a sweep plan", unreadable),
                       unreadable)
    return Sweep(path, runs, scenario, env, plan, unreadable)
