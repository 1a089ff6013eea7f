"""Suite-wide set-up: where the Triton kernels run, and the ``gpu`` marker.

Without a CUDA GPU (CI, a laptop) the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set once,
in :func:`pytest_configure`, before any test module imports ``kernels`` (unless the caller set the variable). With a
GPU it is left alone, so the kernels compile for the GPU: set there, it would run every kernel, CUDA tensors
included, in the interpreter, which is slow and rounds differently (it truncates fp32 -> bf16 / fp16 where the
compiled kernels round to nearest even). Tests that need another setting for themselves (the trainer tests run the
ops' PyTorch references on the CPU: seconds instead of minutes) change it with ``monkeypatch``.

``@pytest.mark.gpu`` (registered in pyproject.toml) marks a test that needs a CUDA GPU; without one it is skipped
here, with the reason, so a GPU test needs no ``skipif`` of its own.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
_SAVED_INTERPRET: list[str | None] = []


def pytest_configure(config: pytest.Config) -> None:
    _SAVED_INTERPRET.append(os.environ.get("TRITON_INTERPRET"))
    if not CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    # leave the environment as found (matters when pytest runs inside another Python process)
    before = _SAVED_INTERPRET.pop() if _SAVED_INTERPRET else None
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _own_machine_lock(tmp_path_factory) -> None:  # noqa: ANN001
    """The suite's sweeps take a machine lock of their own: a real sweep running beside the tests is neither
    refused because of them nor marked as contended (tests of the lock set TUNEBENCH_LOCK_DIR themselves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_LOCK_DIR", str(tmp_path_factory.mktemp("machine_lock")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _machine_in_junit(record_testsuite_property) -> None:  # noqa: ANN001
    """Name the machine in the JUnit XML (``--junitxml``), so a stored GPU test report says where it ran."""
    record_testsuite_property("torch", torch.__version__)
    record_testsuite_property("cuda_available", str(CUDA))
    if CUDA:
        record_testsuite_property("gpu", torch.cuda.get_device_name(0))
        record_testsuite_property("cuda", str(torch.version.cuda))
        try:
            import pynvml  # optional here: the driver version when NVML is installed

            pynvml.nvmlInit()
            record_testsuite_property("driver", str(pynvml.nvmlSystemGetDriverVersion()))
        except Exception as e:  # the GPU name above is what matters; say why the driver is missing
            record_testsuite_property("driver", f"unknown ({type(e).__name__})")
