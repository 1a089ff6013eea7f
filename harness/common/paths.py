"""Where the repository, the work area and the checkpoint cache are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
