"""What every command that measures and writes does with the three ways it can stop early.

Ctrl-C (finished work is stored; rerunning resumes), another runner measuring the machine or the sweep, a folder it
cannot write (read-only, not a folder, full disk), an evaluation that could not run here (lm-eval missing) and a
sweep to fill in that was measured on another kind of GPU become a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from harness.running.evaluator import EvaluatorMissing
from harness.running.locks import Busy
from harness.running.runner import OtherMachine

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the sweep, or the machine, is being measured by another runner
EXIT_INTERRUPTED = 130


def output_dir_problems(**dirs: str | Path | None) -> list[str]:
    """Why each output folder (``--results``, ``--reports``, ...) cannot be written, checked before anything runs: a
    sweep that trains for an hour and then cannot store its rows or its report has lost that hour.

    A folder must be a directory, or not exist yet below a directory (it is created then); a file, or a path through a
    file, cannot be one. Permissions are left to the write itself (as root, every folder is writable).

    Args:
        dirs: option name (``results``, ``reports``) -> the folder given; None: not used.

    Returns:
        ``--option PATH: reason`` lines; empty when every folder can be used.
    """
    out = []
    for option, value in dirs.items():
        if value is None:
            continue
        path = Path(value)
        flag = f"--{option.replace('_', '-')} {path}: cannot write there"
        try:
            probe = path
            while not probe.exists() and probe != probe.parent:
                if probe.is_symlink():  # a link to nowhere: creating the folder would fail
                    out.append(f"{flag}: {probe} is a broken symbolic link")
                    break
                probe = probe.parent
            else:
                if not probe.is_dir():
                    out.append(f"{flag}: {probe} is not a directory" + (" (a folder cannot be created below it)"
                                                                       if probe != path else ""))
        except OSError as e:  # a name too long for the file system
            out.append(f"{flag}: {e.strerror or e}")
        except ValueError as e:  # a NUL character
            out.append(f"{flag}: {e}")
    return out


def failure_text(e: Exception, unforeseen: str, path: object = "") -> str:
    """One line for the exception that ended a command reading stored results: an OS error (a folder that cannot be
    written, a file that vanished) as ``FILE: reason`` (``path`` where it names no file); anything else, a stored file
    of a shape nothing here foresaw, as ``unforeseen: Type: message`` (its first 500 characters, on one line)."""
    if isinstance(e, OSError):
        return f"{e.filename or path}: {e.strerror or e}"
    return f"{unforeseen}: {type(e).__name__}: {' '.join(str(e).split())[:500]}"


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
    except (EvaluatorMissing, OtherMachine) as e:
        print(f"{label}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Busy as e:
        print(f"{label}: {e}", file=sys.stderr)
        return EXIT_BUSY
    except OSError as e:  # a read-only results/reports folder or cache, a full disk
        print(f"{label}: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
