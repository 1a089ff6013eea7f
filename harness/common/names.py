"""One wording for every "unknown name" error: what was asked, the closest match, what exists."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

MAX_SHOWN = 40  # names listed after "available:"; a scenario with thousands of rows must not flood one message
MAX_NAME_SHOWN = 60  # characters of the unknown name itself: it comes from the user's file, any length


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """``unknown preset 'tiny-lama'; did you mean 'tiny-llama'? (available: ...)``"""
    choices = [str(c) for c in choices]
    hint = difflib.get_close_matches(name, choices, n=1) if len(name) <= 200 else []
    shown = repr(name) if len(repr(name)) <= MAX_NAME_SHOWN else repr(name)[: MAX_NAME_SHOWN - 3] + "..."
    listed = ", ".join(choices[:MAX_SHOWN]) + (f", ... ({len(choices) - MAX_SHOWN} more)"
                                               if len(choices) > MAX_SHOWN else "")
    return f"unknown {kind} {shown}" + (f"; did you mean {hint[0]!r}?" if hint else "") + f" (available: {listed})"
