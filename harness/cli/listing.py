"""``python -m harness list``: the frameworks (and why any cannot run here) and the shipped scenarios."""

from __future__ import annotations

import argparse

from adapters_for_tools import registry
from harness.common.paths import REPO_ROOT
from harness.running import envs
from harness.spec.scenario import ScenarioError, load_scenario


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (always 0: an unavailable framework is information)."""
    argparse.ArgumentParser(prog="python -m harness list", description=__doc__).parse_args(argv)
    print("frameworks:")
    for name in registry.names():
        info = registry.info(name)
        why = envs.unavailable(info)
        cuda_note = "" if why else ("" if "cpu" in info.devices else " (CUDA only)")
        state = f"unavailable: {why}" if why else "available" + cuda_note
        print(f"  {name:13s} {state}")
        print(f"  {'':13s} {info.description}; methods {', '.join(sorted(info.methods))}; objectives "
              f"{', '.join(sorted(info.objectives))}; env {info.env}")
    print("scenarios:")
    for p in sorted((REPO_ROOT / "scenarios").glob("*.yaml")):
        try:
            sc = load_scenario(p)
            objective = "" if sc.objective.is_sft else f" {sc.objective.kind}"
            print(f"  {p.relative_to(REPO_ROOT)}: {sc.model.preset or sc.model.weights} {sc.method.kind}{objective} "
                  f"on {sc.hardware.device}, frameworks {', '.join(sc.framework_names())}")
        except ScenarioError as e:
            print(f"  {p.relative_to(REPO_ROOT)}: INVALID: {e.problems[0]}")
        except Exception as e:  # one broken file must not hide the others
            print(f"  {p.relative_to(REPO_ROOT)}: INVALID: internal error while validating: {type(e).__name__}: {e}")
    return 0
