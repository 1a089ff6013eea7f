"""kernels.ops.fused_linear_logprobs against its PyTorch reference: values and every gradient, chunked.

Runs the Triton kernels under ``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py), compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.ops.fused_linear_logprobs import (
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
    sequence_logprobs,
)
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). Reference: float64 logits from the same rounded inputs.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5, "fp32 GEMMs over H <= 96 and an fp32 online logsumexp over V <= 5003"),
    torch.bfloat16: (3e-2, 3e-2, "recomputed logits and dlogits stored in bf16 (rel. step 3.9e-3), bf16 GEMMs"),
    torch.float16: (5e-3, 5e-3, "recomputed logits and dlogits stored in fp16 (rel. step 4.9e-4), fp16 GEMMs"),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(torch.float16, marks=pytest.mark.gpu),
]
# (rows, hidden, vocab, chunk): one row; vocab not a multiple of the 4096-column block and more than one block;
# chunks that do not divide the rows; the default chunk.
CASES = [
    (1, 16, 257, None),
    (7, 33, 1000, 3),
    (62, 48, 5003, 16),
    (64, 96, 3001, None),
]


def _inputs(case, dtype, with_bias, seed=0):  # noqa: ANN001, ANN202
    rows, hdim, vocab, _ = case
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hdim, generator=g).to(DEVICE, dtype)
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(DEVICE, dtype)
    bias = torch.randn(vocab, generator=g).to(DEVICE, dtype) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100  # rows not scored (prompt, padding)
    grad_out = torch.randn(rows, generator=g, dtype=torch.float64)  # a different upstream gradient per row
    return h, w, bias, labels.to(DEVICE), grad_out


def _value_and_grads(fn, h, w, bias, labels, grad_out, upcast, **kw):  # noqa: ANN001, ANN003, ANN202
    leaves = [t.detach().clone() for t in (h, w, bias) if t is not None]
    if upcast:
        leaves = [t.double() for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    logp = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, **kw)
    logp.backward(grad_out.to(logp.device, logp.dtype))
    return logp, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_logprobs_match_reference(case, dtype, with_bias, softcap):  # noqa: ANN001
    atol, rtol, _ = TOLERANCES[dtype]
    h, w, bias, labels, grad_out = _inputs(case, dtype, with_bias)
    got, grads = _value_and_grads(fused_linear_logprobs, h, w, bias, labels, grad_out, False, chunk_size=case[3],
                                  softcap=softcap)
    want, ref_grads = _value_and_grads(fused_linear_logprobs_reference, h, w, bias, labels, grad_out, True,
                                       softcap=softcap)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    assert_close_verbose(got, want, atol, rtol, f"logprobs {case} {dtype}")
    assert torch.all(got[labels == -100] == 0)
    for name, a, e in zip(["dh", "dw", "dbias"], grads, ref_grads, strict=False):
        assert a.dtype == dtype
        assert_close_verbose(a, e, atol, rtol, f"logprobs {name} {case} {dtype}")


def test_logprobs_keep_leading_shape_and_frozen_weight():
    """A ``[B, S, H]`` input gives ``[B, S]`` log-probs; a frozen head gets no gradient and no grad_W work."""
    h, w, _, labels, _ = _inputs((12, 32, 700, None), torch.float32, False)
    h3, labels3 = h.view(3, 4, 32).requires_grad_(True), labels.view(3, 4)
    got = fused_linear_logprobs(h3, w, labels3, chunk_size=5)
    assert got.shape == (3, 4)
    got.sum().backward()
    assert w.grad is None and h3.grad is not None and h3.grad.shape == h3.shape
    want = fused_linear_logprobs_reference(h.double(), w.double(), labels)
    assert_close_verbose(got.reshape(-1), want, 2e-5, 2e-5, "3-D logprobs")


def test_logprobs_under_no_grad_and_chunking():
    """The reference pass of DPO runs under ``no_grad``; chunking does not change a value."""
    h, w, _, labels, _ = _inputs((13, 16, 300, None), torch.float32, False)
    with torch.no_grad():
        per_chunk = [fused_linear_logprobs(h, w, labels, chunk_size=c) for c in (1, 4, 13)]
    for c, got in zip((4, 13), per_chunk[1:], strict=True):
        assert_close_verbose(got, per_chunk[0], 1e-6, 1e-6, f"chunk {c} vs 1")
    assert not per_chunk[0].requires_grad


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any floating-point tensor a torch op returns (the Triton
    interpreter's own copies of kernel arguments are byte tensors: the same storages, not new data)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_logprobs_never_hold_all_logits():
    """With a chunk smaller than the rows, no tensor as large as ``[rows, vocab]`` exists in forward or backward:
    the largest is one ``[chunk, vocab]`` logits buffer."""
    rows, hdim, vocab, chunk = 40, 16, 900, 8
    h, w, _, labels, grad_out = _inputs((rows, hdim, vocab, chunk), torch.float32, False)
    h.requires_grad_(True)
    w.requires_grad_(True)
    with _LargestTensor() as seen:
        fused_linear_logprobs(h, w, labels, chunk_size=chunk).backward(grad_out.float())
    assert seen.largest == max(chunk * vocab, vocab * hdim), seen.largest  # a logits chunk; grad_W [V, H]
    assert seen.largest < rows * vocab


def test_sequence_logprobs_sums_rows_per_sequence():
    logp = torch.tensor([-1.0, -2.0, -0.5, -4.0, -0.25], requires_grad=True)
    seq = torch.tensor([0, 0, 2, 2, 2])
    out = sequence_logprobs(logp, seq, 3)
    torch.testing.assert_close(out, torch.tensor([-3.0, 0.0, -4.75]))
    out.backward(torch.tensor([1.0, 5.0, 2.0]))
    torch.testing.assert_close(logp.grad, torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0]))
    mean = sequence_logprobs(logp.detach(), seq, 3, weights=torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(mean, torch.tensor([-1.5, 0.0, -4.75 / 3]))
