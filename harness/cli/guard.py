"""What every command that measures and writes does with the three ways it can stop early.

Ctrl-C (finished work is stored; rerunning resumes), another runner measuring the machine or the sweep, a folder it
cannot write (read-only, not a folder, full disk) and an evaluation that could not run here (lm-eval missing) become
a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from harness.running.evaluator import EvaluatorMissing
from harness.running.locks import Busy

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the sweep, or the machine, is being measured by another runner
EXIT_INTERRUPTED = 130


def guarded(label: str, what: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code, or the exit code of the way it stopped early.

    Args:
        label: what the messages name (the scenario or suite file).
        what: what was finished and stored before an interruption ("runs", "probes").
        body: the command's work.
    """
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished {what} are stored; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EvaluatorMissing as e:
        print(f"{label}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Busy as e:
        print(f"{label}: {e}", file=sys.stderr)
        return EXIT_BUSY
    except OSError as e:  # a read-only results/reports folder or cache, a full disk
        print(f"{label}: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
