"""Nightly suite files: which scenarios run every night, and how tonight is judged against the recent past.

A suite is a YAML file read as strictly as a scenario (:mod:`harness.spec.yamlsafe`: bounded, duplicate keys
refused, the line of every key recorded); every problem is reported as ``file:line: key: reason``. Example::

    version: 1
    name: nightly_cpu
    scenarios: [../tiny_cpu.yaml]      # relative to the suite file
    frameworks: [dummy]                # optional: only these of each scenario's frameworks
    repeats: 1                         # optional: overrides each scenario's measure.repeats
    reference_nights: 7                # the rolling median is taken over the last N comparable nights
    min_nights: 3                      # fewer comparable nights than this: inconclusive (exit 3)
    noise_k: 3.0                       # band = k x the nights' robust spread (MAD), never below the floor
    gate:
      tokens_per_s: 0.05               # relative drop tolerated
      peak_vram_nvml_gib: 0.05         # relative rise tolerated
    cluster: {executor: slurm, partition: gpu}   # optional: each run a job (harness.spec.cluster)
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from harness.common.names import unknown
from harness.spec import yamlsafe
from harness.spec.cluster import ClusterSettings
from harness.spec.problems import got_text, schema_problems
from harness.spec.yamlsafe import dotted, line_of

SCHEMA_VERSION = 1
# gate-able metrics (stored per run in the history) and whether a higher value is better
GATED_METRICS: dict[str, bool] = {
    "tokens_per_s": True,
    "peak_vram_nvml_gib": False,
    "peak_reserved_gib": False,
    "final_loss": False,
    "joules_per_token": False,
}
MAX_NIGHTS = 365  # a year of nights is more reference than any trend needs


class SuiteError(Exception):
    """A suite file that cannot be used; ``problems`` holds ``file:line: key: reason`` lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Suite(BaseModel):
    """A validated suite (scenario paths resolved against the suite file)."""

    # strict: as a scenario, a value is the type YAML read it as ('3' in quotes is text, not a number)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    version: int = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    scenarios: list[str] = Field(min_length=1, max_length=1000)
    # only these framework rows of each scenario (None: all of them); at least one when given
    frameworks: list[str] | None = Field(default=None, min_length=1)
    repeats: int | None = Field(default=None, ge=1, le=1000)
    reference_nights: int = Field(default=7, ge=1, le=MAX_NIGHTS)
    min_nights: int = Field(default=3, ge=1, le=MAX_NIGHTS)
    noise_k: float = Field(default=3.0, gt=0, le=100)
    gate: dict[str, float] = Field(default_factory=lambda: {"tokens_per_s": 0.05, "peak_vram_nvml_gib": 0.05})
    cluster: ClusterSettings | None = None  # submit each run as a job instead of running it here
    source_path: str | None = Field(default=None, exclude=True)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)  # the line of every key of the file

    @field_validator("frameworks")
    @classmethod
    def _once_each(cls, v: list[str] | None) -> list[str] | None:
        twice = sorted({f for f in v or [] if v.count(f) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
        return v

    @field_validator("gate")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        for metric, threshold in v.items():
            if metric not in GATED_METRICS:
                hint = difflib.get_close_matches(metric, GATED_METRICS, n=1)
                raise ValueError(f"unknown metric {yamlsafe.short_repr(metric)}"
                                 + (f"; did you mean {hint[0]!r}?" if hint else "")
                                 + f" (gate-able: {', '.join(GATED_METRICS)})")
            if not 0 <= threshold < 10:
                raise ValueError(f"{metric}: threshold {threshold!r} must be a relative change in [0, 10)")
        if not v:
            raise ValueError("gate at least one metric")
        return v

    def scenario_paths(self) -> list[Path]:
        """The scenario files, relative paths resolved against the suite file's folder."""
        base = Path(self.source_path).parent if self.source_path else Path.cwd()
        return [p if (p := Path(s)).is_absolute() else base / p for s in self.scenarios]

    def framework_problems(self, rows: list[str]) -> list[str]:
        """``file:line: frameworks[i]: reason`` for each of the suite's ``frameworks`` that is a row of none of its
        scenarios (``rows``: every framework row of every scenario): a typo would silently leave that row out."""
        return [f"{self.source_path}:{line_of(self._lines, ('frameworks', i))}: frameworks[{i}]: "
                + unknown("framework row", f, dict.fromkeys(rows)).replace("(available:", "(the scenarios' rows:")
                for i, f in enumerate(self.frameworks or []) if f not in rows]


def parse_suite(text: str, source: str = "<string>") -> Suite:
    """Parse and validate suite YAML text.

    Args:
        text: the YAML document.
        source: the file name used in error messages and to resolve relative scenario paths.

    Returns:
        The validated :class:`Suite`.

    Raises:
        SuiteError: one ``source:line: key: reason`` line per problem.
    """
    try:
        raw, lines = yamlsafe.load(text)
    except yamlsafe.YamlError as e:
        raise SuiteError([f"{source}:{line}: {dotted(loc)}: {reason}"
                          for line, loc, reason in e.problems][:30]) from None
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else got_text(raw)
        raise SuiteError([f"{source}:1: <top>: a suite is a YAML mapping (version, name, scenarios, gate, ...), "
                          f"got {got}"])
    if "version" in raw and raw["version"] != SCHEMA_VERSION:
        raise SuiteError([f"{source}:{line_of(lines, ('version',))}: version: unsupported suite version "
                          f"{yamlsafe.short_repr(raw['version'])}; this tunebench reads version {SCHEMA_VERSION}"])
    gate = raw.get("gate")
    unknown_metrics = [m for m in gate if m not in GATED_METRICS] if isinstance(gate, dict) else []
    problems = [f"{source}:{line_of(lines, ('gate', m))}: gate.{m}: unknown metric"
                + (f"; did you mean {hint[0]!r}?" if (hint := difflib.get_close_matches(str(m), GATED_METRICS, n=1))
                   else "") + f" (gate-able: {', '.join(GATED_METRICS)})" for m in unknown_metrics]
    if "source_path" in raw:
        problems.append(f"{source}:{line_of(lines, ('source_path',))}: source_path: unknown key (set by tunebench, not "
                        "by a suite file)")
    try:
        suite = Suite.model_validate({k: v for k, v in raw.items() if k != "source_path"})
    except ValidationError as e:
        found = schema_problems(e, raw, lines, source, Suite)
        if unknown_metrics:  # already named, each at its own line
            found = [f for f in found if not f.startswith(f"{source}:{line_of(lines, ('gate',))}: gate: ")]
        raise SuiteError((problems + found)[:30]) from None
    if problems:
        raise SuiteError(problems)
    if suite.min_nights > suite.reference_nights:
        raise SuiteError([f"{source}:{line_of(lines, ('min_nights',))}: min_nights: {suite.min_nights} is more than "
                          f"reference_nights ({suite.reference_nights}): no night could ever be judged"])
    suite.source_path = source
    suite._lines = lines
    return suite


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; its scenario files must exist.

    Raises:
        SuiteError: the file cannot be read, is not a valid suite, or names a scenario file that does not exist.
    """
    path = Path(path)
    try:
        text = yamlsafe.read_text(path) if path.exists() else None
    except yamlsafe.YamlError as e:
        raise SuiteError([f"{path}:{line}: {dotted(loc)}: {reason}" for line, loc, reason in e.problems]) from None
    if text is None:
        raise SuiteError([f"{path}:0: <file>: no such file"])
    suite = parse_suite(text, str(path))
    lines = suite._lines
    paths = suite.scenario_paths()
    missing = [f"{path}:{line_of(lines, ('scenarios', i))}: scenarios[{i}]: "
               + (f"{p} is not a scenario file (a directory, or not a regular file)" if p.exists() else
                  f"no such scenario file: {p}") for i, p in enumerate(paths) if not p.is_file()]
    first: dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p.is_file() and (j := first.setdefault(p.resolve(), i)) != i:
            missing.append(f"{path}:{line_of(lines, ('scenarios', i))}: scenarios[{i}]: {p} is listed twice (first as "
                           f"scenarios[{j}]): it would run twice a night")
    if missing:
        raise SuiteError(missing[:30])
    return suite
