"""The examples teams copy (examples/): each nightly command in them is a command this harness accepts, with a
suite that exists, and the workflow posts the verdict file that command writes. An option renamed or a suite
moved fails here, not in someone's CI at 02:00."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import submitit
import yaml

from harness.cli import cluster_options, nightly
from harness.spec.suite import Suite, load_suite

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
_SHELL_OPS = {">", ">>", "2>&1", "&&", "||", ";", "|"}


def _nightly_commands(text: str) -> list[list[str]]:
    """The arguments after ``-m harness nightly`` of every command line (continuations joined, comments skipped)."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if not line.lstrip().startswith("#") and (m := re.search(r"-m harness nightly (.*)", line)):
            argv = shlex.split(m.group(1))
            out.append(argv[:next((i for i, a in enumerate(argv) if a in _SHELL_OPS), len(argv))])
    return out


def _check(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Suite, object]:
    """Parse ``argv`` as ``nightly`` does, load its suite (relative to the checkout, where the examples run it)
    and build its cluster settings; returns the suite and the launcher (None: runs on the machine itself)."""
    args = nightly.build_parser().parse_args(argv)  # an unknown option exits here
    suite = load_suite(REPO / args.suite)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as on a login node
    return suite, cluster_options.launcher_from(args, suite.cluster)


def test_github_workflow_runs_the_suite_and_posts_its_verdict(monkeypatch):
    wf = yaml.safe_load((EXAMPLES / "github-actions-nightly.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as true
    assert len(on["schedule"][0]["cron"].split()) == 5 and "workflow_dispatch" in on
    (job,) = wf["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    runs = [s["run"] for s in job["steps"] if "run" in s]
    (argv,) = [c for r in runs for c in _nightly_commands(r)]
    suite, launcher = _check(argv, monkeypatch)
    assert launcher is None
    verdict = job["env"]["VERDICT"]
    assert verdict.endswith(f"/nightly-{suite.name}/verdict.md")
    reports_dir = argv[argv.index("--reports") + 1].replace("$TUNEBENCH_HOME", job["env"]["TUNEBENCH_HOME"])
    assert verdict == f"{reports_dir}/nightly-{suite.name}/verdict.md"  # the file the command writes
    assert any('"$VERDICT" >> "$GITHUB_STEP_SUMMARY"' in r for r in runs)
    assert any(r.startswith("gh issue comment") and '--body-file "$VERDICT"' in r for r in runs)
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["with"]["path"].rstrip("/") == str(Path(verdict).parent)


def test_cron_line_runs_the_suite(monkeypatch):
    lines = [ln for ln in (EXAMPLES / "nightly.cron").read_text().splitlines() if ln and not ln.startswith("#")]
    (line,) = lines
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in line.split()[:5])  # minute hour day month weekday
    (argv,) = _nightly_commands(line)
    _check(argv, monkeypatch)


def test_slurm_script_submits_the_suite_through_submitit(monkeypatch):
    script = EXAMPLES / "slurm-nightly.sh"
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    (argv,) = _nightly_commands(script.read_text())
    _, launcher = _check(argv, monkeypatch)
    assert launcher is not None and launcher.settings.executor == "slurm" and not launcher.measures_here
    assert launcher.settings.slurm_params == {"account": "ml-bench"} and launcher.settings.exclusive
