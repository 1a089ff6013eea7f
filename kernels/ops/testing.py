"""Test helpers shared by ``tests/kernels`` and the benchmarks (lives here so tests need no rootdir tricks)."""

from __future__ import annotations

import torch


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    name: str,
    max_report: int = 5,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a useful failure message.

    Compares in float64 on the CPU. NaN/inf must match exactly (same positions, same sign of inf); the message
    reports how many elements fail, the worst absolute and relative error, and where the first failures are.

    Args:
        actual: Tensor produced by the op under test.
        expected: Reference tensor (any float dtype; broadcasting is not allowed).
        atol: Absolute tolerance, must be < 1.
        rtol: Relative tolerance, must be < 1.
        name: What is compared, e.g. ``"rms_norm dx fp32 (7, 781)"``.
        max_report: How many failing indices to list.

    Raises:
        AssertionError: On shape mismatch, non-finite mismatch or tolerance violation.
    """
    assert 0 <= atol < 1 and 0 <= rtol < 1, "a tolerance of 1 or more would hide any error"
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    nonfinite_bad = (a_nan != e_nan) | (a_inf != e_inf) | (a_inf & e_inf & (torch.sign(a) != torch.sign(e)))
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(both_finite, (a - e).abs(), torch.zeros_like(a))
    allowed = atol + rtol * e.abs()
    bad = nonfinite_bad | (both_finite & (err > allowed))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    idx = bad.nonzero()[:max_report]
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    lines = [
        f"{name}: {n_bad}/{a.numel()} elements outside atol={atol:g} rtol={rtol:g}",
        f"  max abs err {err.max().item():.3e} at {worst}",
        f"  max rel err {(err / e.abs().clamp_min(1e-30)).max().item():.3e}",
        f"  NaN actual/expected: {int(a_nan.sum())}/{int(e_nan.sum())}, inf actual/expected: "
        f"{int(a_inf.sum())}/{int(e_inf.sum())}",
    ]
    for i in idx.tolist():
        lines.append(f"  at {tuple(i)}: actual {a[tuple(i)].item():.6e} expected {e[tuple(i)].item():.6e}")
    raise AssertionError("\n".join(lines))
