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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.spec import yamlsafe
from harness.spec.cluster import ClusterSettings
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

    model_config = ConfigDict(extra="forbid")

    version: int = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    scenarios: list[str] = Field(min_length=1)
    frameworks: list[str] | None = None
    repeats: int | None = Field(default=None, ge=1, le=1000)
    reference_nights: int = Field(default=7, ge=1, le=MAX_NIGHTS)
    min_nights: int = Field(default=3, ge=1, le=MAX_NIGHTS)
    noise_k: float = Field(default=3.0, gt=0, le=100)
    gate: dict[str, float] = Field(default_factory=lambda: {"tokens_per_s": 0.05, "peak_vram_nvml_gib": 0.05})
    cluster: ClusterSettings | None = None  # submit each run as a job instead of running it here
    source_path: str | None = Field(default=None, exclude=True)

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
        raise SuiteError([f"{source}:{line}: {dotted(loc)}: {reason}" for line, loc, reason in e.problems]) from None
    if not isinstance(raw, dict):
        raise SuiteError([f"{source}:1: <top>: a suite is a YAML mapping, got {type(raw).__name__}"])
    if "version" in raw and raw["version"] != SCHEMA_VERSION:
        raise SuiteError([f"{source}:{line_of(lines, ('version',))}: version: unsupported suite version "
                          f"{yamlsafe.short_repr(raw['version'])}; this tunebench reads version {SCHEMA_VERSION}"])
    gate = raw.get("gate")
    unknown = [m for m in gate if m not in GATED_METRICS] if isinstance(gate, dict) else []
    problems = [f"{source}:{line_of(lines, ('gate', m))}: gate.{m}: unknown metric"
                + (f"; did you mean {hint[0]!r}?" if (hint := difflib.get_close_matches(str(m), GATED_METRICS, n=1))
                   else "") + f" (gate-able: {', '.join(GATED_METRICS)})" for m in unknown]
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden" and (len(loc) == 1 or loc[:1] == ("cluster",) and len(loc) == 2):
                fields = [k for k in (Suite if len(loc) == 1 else ClusterSettings).model_fields if k != "source_path"]
                hint = difflib.get_close_matches(str(loc[-1]), fields, n=1)
                msg = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "") + \
                    f" (allowed: {', '.join(fields)})"
            if not (loc == ("gate",) and unknown):  # already named, each at its own line
                problems.append(f"{source}:{line_of(lines, loc)}: {dotted(loc)}: {msg}")
        raise SuiteError(problems[:30]) from None
    if problems:
        raise SuiteError(problems)
    if suite.min_nights > suite.reference_nights:
        raise SuiteError([f"{source}:{line_of(lines, ('min_nights',))}: min_nights: {suite.min_nights} is more than "
                          f"reference_nights ({suite.reference_nights}): no night could ever be judged"])
    suite.source_path = source
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
    _, lines = yamlsafe.load(text)
    missing = [f"{path}:{line_of(lines, ('scenarios', i))}: scenarios[{i}]: no such scenario file: {p}"
               for i, p in enumerate(suite.scenario_paths()) if not p.is_file()]
    if missing:
        raise SuiteError(missing)
    return suite
