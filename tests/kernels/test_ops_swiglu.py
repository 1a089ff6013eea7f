import pytest
import torch

from kernels.ops.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). Reference: float64 on the same rounded inputs; elementwise op, no reductions.
TOLERANCES = {
    torch.float32: (1e-6, 1e-5, "fp32 exp/sigmoid vs float64: a few ulp"),
    torch.bfloat16: (1e-2, 8e-3, "one bf16 rounding of the result (rel. step 2^-8 = 3.9e-3), x2 margin"),
    torch.float16: (1e-3, 1e-3, "one fp16 rounding of the result (rel. step 2^-11 = 4.9e-4), x2 margin"),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(torch.float16, marks=pytest.mark.gpu),
]


OPS = [pytest.param(swiglu, swiglu_reference, id="swiglu"), pytest.param(geglu, geglu_reference, id="geglu")]


@pytest.mark.parametrize(("op", "reference"), OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 781), (2, 3, 1025), (123, 17)])
def test_gated_act_matches_reference(op, reference, shape, dtype):
    atol, rtol, _ = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(0)
    # scale 4 so the activation's negative tail and saturation are both exercised
    gate = (4 * torch.randn(shape, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    up = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = op(gate, up)
    out.backward(dout)
    gate64 = gate.detach().double().requires_grad_(True)
    up64 = up.detach().double().requires_grad_(True)
    ref = reference(gate64, up64)
    ref.backward(dout.double())
    name = op.__name__
    assert out.dtype == dtype
    assert_close_verbose(out, ref, atol, rtol, f"{name} out {dtype} {shape}")
    assert_close_verbose(gate.grad, gate64.grad, atol, rtol, f"{name} dgate {dtype} {shape}")
    assert_close_verbose(up.grad, up64.grad, atol, rtol, f"{name} dup {dtype} {shape}")


@pytest.mark.parametrize(("op", "reference"), OPS)
def test_gated_act_non_contiguous_halves(op, reference):
    # gate/up as the two halves of a fused gate_up projection: strided views.
    gate_up = torch.randn(5, 2 * 96, device=DEVICE, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    op(gate, up).sum().backward()
    ref_in = gate_up.detach().double().requires_grad_(True)
    rg, ru = ref_in.chunk(2, dim=-1)
    reference(rg, ru).sum().backward()
    assert_close_verbose(gate_up.grad, ref_in.grad, 1e-6, 1e-5, f"{op.__name__} fused-halves grad")


def test_geglu_is_not_swiglu():
    """The activation switch reaches the kernel: the two ops differ where GELU and SiLU do."""
    gate = torch.linspace(-4, 4, 257, device=DEVICE)
    up = torch.ones_like(gate)
    diff = (geglu(gate, up) - swiglu(gate, up)).abs().max().item()
    assert diff > 0.1, diff
