"""Shared fixtures of the trainer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The trainer tests' CPU setup.

    Tiny matmuls single-threaded: 2 OpenMP threads on a busy 2-core machine spin ~15 ms per matmul. And the
    ops' PyTorch fallback rather than Triton's interpreter, which tests/conftest.py switches on for the session
    on a machine without a GPU: each kernel interpreted in every trainer test would take minutes instead of
    seconds; the ops themselves are tested under the interpreter in the ``test_ops_*`` modules.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_llama_fp32(tmp_path_factory):  # noqa: ANN001, ANN201
    """A generated tiny-llama float32 checkpoint (seed 0) in a cache private to the test module."""
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(tmp_path_factory.mktemp("tiny_llama_cache")))
        yield prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
