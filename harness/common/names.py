"""One wording for every "unknown name" error: what was asked, the closest match, what exists."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """``unknown preset 'tiny-lama'; did you mean 'tiny-llama'? (available: ...)``"""
    choices = list(choices)
    hint = difflib.get_close_matches(name, choices, n=1)
    return (f"unknown {kind} {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (available: {', '.join(choices)})")
