"""Fixtures of the harness tests."""

from __future__ import annotations

import pytest
import torch
from handloop_scenario import HANDLOOP_SCENARIO

from harness.spec.scenario import load_scenario


@pytest.fixture()
def env(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A sandbox: checkpoint cache and work area inside the test's own tmp_path."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # noqa: ANN001, ANN201
    """The scenario file and its parsed scenario, with a private checkpoint cache; tiny matmuls on one thread and
    the trainer's PyTorch op references (not Triton's interpreter, which tests/conftest.py switches on)."""
    d = tmp_path_factory.mktemp("handloop")
    path = d / "handloop_test.yaml"
    path.write_text(HANDLOOP_SCENARIO)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(d / "cache"))
        mp.setenv("TRITON_INTERPRET", "0")
        yield path, load_scenario(path)
    torch.set_num_threads(n)
