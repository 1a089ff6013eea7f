"""The quality evaluation of a run's saved output, the same for every framework, and whether it can run here.

lm-eval on the scenario's ``eval.tasks`` (:mod:`harness.analysis.evaluate`) and the reward accuracy on held-out
preference pairs (:mod:`harness.analysis.reward`) run in a process of their own, in the ``lmeval`` environment
where one is installed (GPU boxes whose interpreter lacks lm-eval), else in the base one. :func:`check` runs before
a sweep starts: a module the evaluation needs that its environment lacks stops the sweep before anything trains,
instead of leaving every trained run with an evaluation error.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from harness.running import envs
from harness.running.envs import worker_environment
from harness.storing import results


class EvaluatorMissing(Exception):
    """The scenario's quality evaluation cannot run on this machine (raised before a sweep starts)."""


# what each evaluation imports: lm-eval for eval.tasks, the model libraries for the reward accuracy of eval_pairs
MODULES = {"eval": ("lm_eval",), "reward": ("transformers", "peft")}


def environment() -> envs.EnvSpec:
    """The `lmeval` environment where one was installed, else the base one."""
    ev_env = envs.resolve("lmeval")
    return ev_env if ev_env.ready else envs.resolve("base")


def check(sc) -> None:  # noqa: ANN001 (a Scenario)
    """Raise :class:`EvaluatorMissing` when a module that the scenario's evaluation imports is not found in the
    evaluation's environment (looked up there, not imported)."""
    wanted = [*(MODULES["eval"] if sc.eval.tasks else ()), *(MODULES["reward"] if sc.objective.eval_pairs else ())]
    if not wanted:
        return
    env = environment()
    code = "import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    try:
        proc = subprocess.run([env.python, "-c", code, *wanted], env=worker_environment(env), capture_output=True,
                              text=True, timeout=300)
        missing = proc.stdout.split() if proc.returncode == 0 else wanted
    except (OSError, subprocess.TimeoutExpired):  # an interpreter that does not start or answer
        missing = wanted
    if missing:
        raise EvaluatorMissing(
            f"the scenario's evaluation needs {', '.join(missing)}, not found in the {env.name!r} environment "
            f"({env.python}): `python -m harness env create lmeval`, or install its offline bundle "
            f"(`python -m harness env install BUNDLE`); nothing was run")


def evaluate(sc, work_dir: Path, res: dict, module: str = "harness.analysis.evaluate",  # noqa: ANN001
             name: str = "eval") -> dict:
    """Quality of run ``res``'s trained output: lm-eval (``module`` harness.analysis.evaluate), or the reward
    accuracy on held-out pairs (harness.analysis.reward, ``name`` "reward"); the evaluator's result dict, or an
    error dict when it wrote none."""
    spec = {"scenario": sc.to_dict(), "scenario_source": sc.source_path, "checkpoint": res.get("checkpoint"),
            "output_dir": res.get("output_dir"), "work_dir": str(work_dir)}
    p = work_dir / f"{name}_spec.json"
    p.write_text(json.dumps(spec, indent=1))
    out = work_dir / f"{name}_result.json"
    ev_env = environment()
    proc = subprocess.run([ev_env.python, "-m", module, str(p)], cwd=work_dir, env=worker_environment(ev_env),
                          capture_output=True, text=True, timeout=sc.measure.timeout_s)
    data = results.read_json(out)
    if data is None:
        return {"status": "error", "error": f"evaluation failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
    return data
