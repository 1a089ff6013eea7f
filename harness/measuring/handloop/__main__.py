"""Run one hand loop in this process: ``python -m harness.measuring.handloop FRAMEWORK SCENARIO``.

``python -m harness selfcheck`` starts this in the framework's own environment (Unsloth patches transformers on
import, so no two tools share a process) and compares the result with a stored sweep; run it directly to time one
loop, or to bisect a difference with ``--set`` (hf knobs: :class:`~harness.measuring.handloop.knobs.HfKnobs`).

Writes one JSON object (``--out FILE``, else stdout): ``status`` (ok | unavailable | error), ``reason``, the
loop's figures and ``settings``. Exit codes: 0 ok or unavailable (a result either way), 1 the loop failed,
2 bad arguments or scenario.

Examples::

    python -m harness.measuring.handloop hf scenarios/smoke_gpu.yaml --out hf-loop.json
    python -m harness.measuring.handloop hf scenarios/smoke_gpu.yaml --set attention_mask=false
    python -m harness.measuring.handloop tunebench scenarios/tiny_cpu.yaml --steps 4
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from harness.inputs import models
from harness.measuring.handloop import FRAMEWORKS, LOOP_MODULES
from harness.measuring.handloop.common import Unavailable, device_of
from harness.measuring.handloop.knobs import parse_knobs
from harness.spec.scenario import ScenarioError, load_scenario


def run_loop(framework: str, sc, steps: int | None = None, knob_pairs: list[str] | None = None) -> dict:  # noqa: ANN001
    """One hand loop's result for scenario ``sc``: ``status`` ok with figures and settings, or unavailable / error
    with the reason.

    Args:
        framework: one of :data:`~harness.measuring.handloop.FRAMEWORKS`.
        sc: the scenario.
        steps: optimizer steps (default: the scenario's).
        knob_pairs: ``KEY=VALUE`` hf knobs (hf only).
    """
    t0 = time.time()
    head = {"framework": framework, "scenario": sc.name, "settings_hash": sc.settings_hash(framework)
            if framework in sc.framework_names() else None}
    try:
        if knob_pairs and framework != "hf":
            raise ValueError(f"--set knobs are hf's; the {framework} loop runs its adapter's defaults")
        device = device_of(sc)
        # each tool module imports its toolkit: only the one asked for is loaded (Unsloth must patch first)
        mod = importlib.import_module(LOOP_MODULES[framework])
        checkpoint = str(models.resolve_checkpoint(sc.model, device=device))
        n = steps or sc.train.steps
        res = (mod.run(sc, checkpoint, device, n, parse_knobs(knob_pairs or [])) if framework == "hf"
               else mod.run(sc, checkpoint, device, n))
    except Unavailable as e:
        return head | {"status": "unavailable", "reason": str(e)}
    except Exception as e:  # the check goes on with the other tools; the reason and traceback are the result
        return head | {"status": "error", "reason": f"{type(e).__name__}: {e}"[:1000],
                       "traceback": traceback.format_exc()[-4000:]}
    return head | {"status": "ok", "reason": None, "wall_s": time.time() - t0} | res


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m harness.measuring.handloop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("framework", choices=FRAMEWORKS)
    ap.add_argument("scenario")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the scenario's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an hf knob (repeatable)")
    ap.add_argument("--out", help="write the result JSON here (default: stdout)")
    args = ap.parse_args(argv)
    try:
        sc = load_scenario(args.scenario)
        parse_knobs(args.set)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps {args.steps}: at least 1")
    except (ScenarioError, ValueError, OSError) as e:
        print(f"handloop: {e}", file=sys.stderr)
        return 2
    res = run_loop(args.framework, sc, args.steps, args.set)
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if res["status"] == "error":
        print(f"handloop: {args.framework}: {res['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
