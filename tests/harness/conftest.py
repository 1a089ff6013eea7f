"""Fixtures of the harness tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def env(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A sandbox: checkpoint cache and work area inside the test's own tmp_path."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    return tmp_path
