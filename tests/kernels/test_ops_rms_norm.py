import pytest
import torch

from kernels.ops.rms_norm import rms_norm, rms_norm_reference
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). The reference runs in float64 on the same (already rounded) inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5, "fp32 math both ways; only summation order differs (N <= 1024 terms)"),
    torch.bfloat16: (2e-2, 1.6e-2, "outputs rounded to bf16 (rel. step 2^-8 = 3.9e-3), dw summed over rows"),
    torch.float16: (2e-3, 2e-3, "outputs rounded to fp16 (rel. step 2^-11 = 4.9e-4), dw summed over rows"),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(torch.float16, marks=pytest.mark.gpu),
]
SHAPES = [(1, 7), (7, 781), (3, 5, 64), (123, 33)]


def _inputs(shape, dtype, with_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_residual else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    dh = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_residual else None
    return x, w, r, dy, dh


def _run(fn, x, w, r, dy, dh, eps, upcast):
    leaves = [t.detach().clone() for t in (x, w, r) if t is not None]
    if upcast:
        leaves = [t.double() for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    x_, w_, r_ = leaves[0], leaves[1], (leaves[2] if r is not None else None)
    out = fn(x_, w_, eps, r_)
    if r is None:
        out.backward(dy.to(out.dtype))
        outs = [out]
    else:
        y, h = out
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
        outs = [y, h]
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(shape, dtype, with_residual):
    atol, rtol, _ = TOLERANCES[dtype]
    x, w, r, dy, dh = _inputs(shape, dtype, with_residual)
    outs, grads = _run(rms_norm, x, w, r, dy, dh, 1e-6, upcast=False)
    ref_outs, ref_grads = _run(rms_norm_reference, x, w, r, dy, dh, 1e-6, upcast=True)
    names = ["y", "h"]
    for i, (a, e) in enumerate(zip(outs, ref_outs, strict=True)):
        assert a.dtype == dtype
        assert_close_verbose(a, e, atol, rtol, f"rms_norm {names[i]} {dtype} {shape}")
    gnames = ["dx", "dw", "dresidual"]
    for i, (a, e) in enumerate(zip(grads, ref_grads, strict=True)):
        # dw sums N_rows terms: scale atol with the row count so the bound stays meaningful.
        n_rows = x.numel() // shape[-1]
        tol = atol * (max(1, n_rows) ** 0.5 if gnames[i] == "dw" else 1)
        assert_close_verbose(a, e, tol, rtol, f"rms_norm {gnames[i]} {dtype} {shape}")


def test_rms_norm_strided_rows():
    # A row-strided view (e.g. a slice of a wider buffer) must work without a copy changing results.
    base = torch.randn(9, 100, device=DEVICE)
    x = base[:, :64]
    w = torch.randn(64, device=DEVICE)
    assert_close_verbose(rms_norm(x, w, 1e-5), rms_norm_reference(x.double(), w.double(), 1e-5), 1e-5, 1e-5, "strided")


def test_cpu_fallback_without_interpreter(monkeypatch):
    # Without TRITON_INTERPRET a CPU tensor must take the reference path (the trainer's CPU mode).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 16)
    w = torch.randn(16)
    assert_close_verbose(rms_norm(x, w), rms_norm_reference(x, w), 0.0, 0.0, "fallback")
