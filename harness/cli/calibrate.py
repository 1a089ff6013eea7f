"""``python -m harness calibrate``: measure the GPU's dense bf16 matmul rate, beside the datasheet figure MFU uses.

Exit codes: 0 measured, 2 no CUDA GPU or a bad option.

Example::

    python -m harness calibrate --out calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.cli.guard import output_dir_problems
from harness.measuring.calibrate import measure

MAX_SIZE = 1 << 16


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m harness calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="square matrix size (default 8192)")
    ap.add_argument("--out", help="write the measurement as JSON here")
    args = ap.parse_args(argv)
    if not 16 <= args.size <= MAX_SIZE:
        print(f"calibrate: --size {args.size}: between 16 and {MAX_SIZE} (two bf16 matrices of {MAX_SIZE}^2 are "
              "8 GiB)", file=sys.stderr)
        return 2
    if args.out and (Path(args.out).is_dir() or output_dir_problems(out=Path(args.out).parent)):
        print(f"calibrate: --out {args.out}: not a file that can be written", file=sys.stderr)
        return 2
    try:
        res = measure(args.size)
    except RuntimeError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0
