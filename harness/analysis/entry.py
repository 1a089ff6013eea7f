"""The entry point the runner's evaluator subprocesses share (lm-eval in ``evaluate``, reward scoring in ``reward``).

Each reads the JSON spec the runner wrote, evaluates, and always leaves its result file in the spec's ``work_dir``:
an exception becomes ``{"status": "error", ...}`` there, so a failed evaluation is a recorded part of the run's
result and the sweep goes on.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.storing.results import atomic_write_text


def spec_main(argv: list[str] | None, module: str, result_name: str,
              evaluate: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """``python -m MODULE SPEC.json``: run ``evaluate(spec)`` and write its result (or the error) to
    ``work_dir/RESULT_NAME`` atomically. Returns 0 on an ok result, 1 otherwise, 2 on a wrong command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["work_dir"]) / result_name
    try:
        result = evaluate(spec)
    except Exception as e:  # recorded in the run's result; the sweep goes on
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                  "traceback": traceback.format_exc()[-6000:]}
    atomic_write_text(out, json.dumps(result, indent=1))
    return 0 if result["status"] == "ok" else 1
