import pytest
import torch

from kernels.ops.lora_linear import (
    dropout_mask,
    lora_linear,
    lora_linear_group,
    lora_linear_reference,
    reuse_dequantised,
    reusing_dequantised,
)
from kernels.ops.nf4 import dequantize_nf4_reference, quantize_nf4
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). Reference: float64 on the same rounded inputs and the same dropout mask.
# dA/dB reduce over up to 123 tokens; the op keeps the [T, r] intermediates (s * dy B, s * x_drop A^T) in fp32
# (hi + lo pairs) and rounds dA/dB once at the end, so rtol covers the final rounding and atol the rest.
# Rounding dy B to bf16 instead (rel. 2^-9 per term) gives an error ~ s * sqrt(123) * 2^-9 * |dy B| * |x|
# (std 0.037, max 0.17 here) that does not shrink with |dA|: it failed on the H100 (0.217 max, 8/768 elements).
TOLERANCES = {
    torch.float32: (1e-4, 2e-5, "fp32 GEMMs; dA/dB reduce over up to 123 tokens of O(1) products"),
    torch.bfloat16: (3e-2, 2e-2, "bf16 inputs and outputs (rel. step 3.9e-3); fp32 intermediates"),
    torch.float16: (4e-3, 4e-3, "fp16 inputs and outputs (rel. step 4.9e-4); fp32 intermediates"),
}
# bf16/fp16 also run on the CPU: the op is torch GEMMs (CPU matmul supports both) plus the NF4 dequant kernel,
# which the interpreter runs in these dtypes. On CPU _mm_f32 upcasts instead of cuBLAS out_dtype=float32.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IN, OUT, RANK = 96, 81, 8


def _params(dtype, with_bias, nf4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(DEVICE, dtype)
    if nf4:
        # Compare against the same dequantised weight: the quantisation error itself is nf4's test.
        q = quantize_nf4(w)
        w, w_ref = q, dequantize_nf4_reference(q, torch.float64)
    else:
        w_ref = w
    a = (torch.randn(RANK, IN, generator=g) / IN**0.5).to(DEVICE, dtype)
    b = (torch.randn(OUT, RANK, generator=g) / OUT**0.5).to(DEVICE, dtype)  # non-zero B: dA is non-trivial
    bias = torch.randn(OUT, generator=g).to(DEVICE, dtype) if with_bias else None
    return w, w_ref, a, b, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(1, IN), (7, IN), (3, 41, IN)])
@pytest.mark.parametrize(("with_bias", "dropout", "nf4"), [(False, 0.0, False), (True, 0.25, False), (True, 0.0, True),
                                                           (False, 0.1, True)])  # fmt: skip
def test_lora_linear_matches_reference(x_shape, dtype, with_bias, dropout, nf4):
    atol, rtol, _ = TOLERANCES[dtype]
    w, w_ref, a, b, bias = _params(dtype, with_bias, nf4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g).to(DEVICE, dtype)
    dy = torch.randn(*x_shape[:-1], OUT, generator=g).to(DEVICE, dtype)
    scale = 2.0

    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)] + (
        [bias.clone().requires_grad_(True)] if with_bias else []
    )
    torch.manual_seed(123)
    y = lora_linear(leaves[0], w, leaves[1], leaves[2], scale, leaves[3] if with_bias else None, dropout_p=dropout)
    y.backward(dy)

    torch.manual_seed(123)  # same RNG stream -> same dropout mask
    mask = dropout_mask(x.shape, dropout, x.device) if dropout > 0 else None
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = lora_linear_reference(ref_leaves[0], w_ref, ref_leaves[1], ref_leaves[2], scale,
                                ref_leaves[3] if with_bias else None, mask, dropout)  # fmt: skip
    ref.backward(dy.double())
    tag = f"{dtype} {x_shape} bias={with_bias} p={dropout} nf4={nf4}"
    assert y.dtype == dtype
    assert_close_verbose(y, ref, atol, rtol, f"lora y {tag}")
    for name, t, r in zip(["dx", "dA", "dB", "dbias"], leaves, ref_leaves, strict=False):
        assert_close_verbose(t.grad, r.grad, atol, rtol, f"lora {name} {tag}")


def test_lora_linear_rejects_trainable_base_weight():
    w = torch.randn(OUT, IN, requires_grad=True)
    with pytest.raises(ValueError, match="never computes dW"):
        lora_linear(torch.randn(2, IN), w, torch.randn(RANK, IN), torch.randn(OUT, RANK), 1.0)


def test_lora_linear_eval_has_no_dropout():
    w, _, a, b, _ = _params(torch.float32, False, False)
    x = torch.randn(5, IN, device=DEVICE)
    y1 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, training=False)
    y2 = lora_linear(x, w, a, b, 1.0, dropout_p=0.0)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_fp32_adapter_weights(dtype, dropout):
    """A/B stored in fp32 (the trainer's default, as PEFT) with bf16/fp16 activations: the op casts them for the
    GEMMs and returns dA/dB in fp32, rounded once. They agree with the float64 reference on the *rounded* A/B
    (what the GEMMs see) more tightly than a gradient rounded to bf16 could (rtol 2e-5, not 2e-2)."""
    w, _, a, b, _ = _params(torch.float32, False, False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 41, IN, generator=g).to(DEVICE, dtype)
    dy = torch.randn(3, 41, OUT, generator=g).to(DEVICE, dtype)
    w = w.to(dtype)
    a32, b32 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    torch.manual_seed(5)
    y = lora_linear(x, w, a32, b32, 2.0, dropout_p=dropout)
    y.backward(dy)
    assert y.dtype == dtype and a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    torch.manual_seed(5)
    mask = dropout_mask(x.shape, dropout, x.device) if dropout > 0 else None
    ra = a.to(dtype).double().requires_grad_(True)  # the values the op's GEMMs use
    rb = b.to(dtype).double().requires_grad_(True)
    ref = lora_linear_reference(x.double(), w.double(), ra, rb, 2.0, None, mask, dropout)
    ref.backward(dy.double())
    atol = TOLERANCES[dtype][0]
    assert_close_verbose(y, ref, atol, TOLERANCES[dtype][1], f"y {dtype} p={dropout}")
    # fp32 dA/dB: the only roundings left are the bf16 operands the reference shares, and fp32 accumulation
    assert_close_verbose(a32.grad, ra.grad, 1e-3, 2e-5, f"dA fp32 {dtype} p={dropout}")
    assert_close_verbose(b32.grad, rb.grad, 1e-3, 2e-5, f"dB fp32 {dtype} p={dropout}")


# q/k/v of a GQA attention (odd, unequal widths) and gate/up of an MLP
GROUPS = {"qkv": (OUT, 24, 24), "gate_up": (57, 57)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(1, IN), (3, 41, IN)])
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize(("with_bias", "nf4", "ab32"),
                         [(False, False, False), (True, False, True), (False, True, True)])
def test_lora_linear_group_matches_reference(dtype, x_shape, group, with_bias, nf4, ab32):
    """The grouped op (one autograd node for q/k/v or gate/up) against the float64 reference of each projection:
    outputs, dx (summed over the projections by the op itself) and every dA/dB/dbias; A/B in the activation
    dtype or in fp32 storage (then compared on the rounded values the GEMMs see, like the single op's test)."""
    atol, rtol, _ = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(7)
    outs = GROUPS[group]
    ws, w_refs, As, Bs, biases = [], [], [], [], []
    for o in outs:
        w = (torch.randn(o, IN, generator=g) / IN**0.5).to(DEVICE, dtype)
        if nf4:
            q = quantize_nf4(w)
            ws.append(q)
            w_refs.append(dequantize_nf4_reference(q, torch.float64))
        else:
            ws.append(w)
            w_refs.append(w)
        As.append((torch.randn(RANK, IN, generator=g) / IN**0.5).to(DEVICE, dtype))
        Bs.append((torch.randn(o, RANK, generator=g) / o**0.5).to(DEVICE, dtype))
        biases.append(torch.randn(o, generator=g).to(DEVICE, dtype) if with_bias else None)
    x = torch.randn(x_shape, generator=g).to(DEVICE, dtype)
    dys = [torch.randn(*x_shape[:-1], o, generator=g).to(DEVICE, dtype) for o in outs]
    store = torch.float32 if ab32 else dtype
    xl = x.clone().requires_grad_(True)
    al = [a.to(store).clone().requires_grad_(True) for a in As]
    bl = [b.to(store).clone().requires_grad_(True) for b in Bs]
    biasl = [b.clone().requires_grad_(True) if b is not None else None for b in biases]
    ys = lora_linear_group(xl, ws, al, bl, 2.0, biasl)
    torch.autograd.backward(ys, dys)

    xr = x.double().requires_grad_(True)
    ar = [a.double().requires_grad_(True) for a in As]
    br = [b.double().requires_grad_(True) for b in Bs]
    biasr = [b.double().requires_grad_(True) if b is not None else None for b in biases]
    refs = [lora_linear_reference(xr, w, a, b, 2.0, bias) for w, a, b, bias in zip(w_refs, ar, br, biasr, strict=True)]
    torch.autograd.backward(refs, [d.double() for d in dys])
    tag = f"{group} {dtype} {x_shape} bias={with_bias} nf4={nf4} ab32={ab32}"
    assert_close_verbose(xl.grad, xr.grad, atol, rtol, f"group dx {tag}")
    for i, (y, ref) in enumerate(zip(ys, refs, strict=True)):
        assert y.dtype == dtype and y.shape == ref.shape
        assert_close_verbose(y, ref, atol, rtol, f"group y{i} {tag}")
        assert al[i].grad.dtype == store and bl[i].grad.dtype == store
        assert_close_verbose(al[i].grad, ar[i].grad, atol, rtol, f"group dA{i} {tag}")
        assert_close_verbose(bl[i].grad, br[i].grad, atol, rtol, f"group dB{i} {tag}")
        if with_bias:
            assert_close_verbose(biasl[i].grad, biasr[i].grad, atol, rtol, f"group dbias{i} {tag}")


def test_lora_linear_group_equals_single_calls_fp32():
    """fp32: the grouped op computes what separate lora_linear calls compute (up to summation order)."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(o, IN, generator=g).to(DEVICE) / IN**0.5 for o in (40, 8, 8)]
    As = [torch.randn(RANK, IN, generator=g).to(DEVICE).requires_grad_(True) for _ in ws]
    Bs = [torch.randn(w.shape[0], RANK, generator=g).to(DEVICE).requires_grad_(True) for w in ws]
    x = torch.randn(5, 9, IN, generator=g).to(DEVICE).requires_grad_(True)
    ys = lora_linear_group(x, ws, As, Bs, 0.5)
    sum(y.square().sum() for y in ys).backward()
    grads = [t.grad.clone() for t in (x, *As, *Bs)]
    for t in (x, *As, *Bs):
        t.grad = None
    ys1 = [lora_linear(x, w, a, b, 0.5) for w, a, b in zip(ws, As, Bs, strict=True)]
    sum(y.square().sum() for y in ys1).backward()
    for y, y1 in zip(ys, ys1, strict=True):
        torch.testing.assert_close(y, y1, atol=1e-5, rtol=1e-5)
    # gradients up to ~7e3 here: fp32 summation order, ~2e-7 of the largest
    for got, t in zip(grads, (x, *As, *Bs), strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-6 * float(t.grad.abs().max()), rtol=1e-5)


def test_lora_linear_group_rejects_unequal_ranks():
    ws = [torch.randn(8, IN), torch.randn(8, IN)]
    with pytest.raises(ValueError, match="ranks differ"):
        lora_linear_group(torch.randn(2, IN), ws, [torch.randn(4, IN), torch.randn(8, IN)],
                          [torch.randn(8, 4), torch.randn(8, 8)], 1.0)


def _lora_ops_module():  # noqa: ANN202
    import importlib

    return importlib.import_module("kernels.ops.lora_linear")  # the module (the package re-exports the function)


def _op_node(y: torch.Tensor):  # noqa: ANN202
    """The op's autograd node (its ctx) behind ``y``, past the reshaping view of the public wrapper."""
    node = y.grad_fn
    while not hasattr(node, "kept"):
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("grouped", [False, True])
def test_reuse_dequantised_keeps_the_forwards_nf4_weight_for_backward(monkeypatch, grouped):
    """Inside ``reuse_dequantised`` an NF4 weight is dequantised once for forward + backward (else twice), the
    results and gradients are bitwise the same, a dense weight is never kept, and backward drops the kept copy."""
    ll = _lora_ops_module()
    calls = []
    real = ll.dequantize_nf4
    monkeypatch.setattr(ll, "dequantize_nf4", lambda q, dtype=None: calls.append(q) or real(q, dtype))
    dtype, g = torch.bfloat16, torch.Generator().manual_seed(7)
    w_dense = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(DEVICE, dtype)
    ws = [quantize_nf4(w_dense), w_dense, quantize_nf4(w_dense.flip(0))]  # NF4, dense, NF4
    As = [(torch.randn(RANK, IN, generator=g) / IN**0.5).to(DEVICE, dtype) for _ in ws]
    Bs = [(torch.randn(OUT, RANK, generator=g) / OUT**0.5).to(DEVICE, dtype) for _ in ws]
    x0 = torch.randn(3, 11, IN, generator=g).to(DEVICE, dtype)
    dys = [torch.randn(3, 11, OUT, generator=g).to(DEVICE, dtype) for _ in ws]
    runs = {}
    for reuse in (False, True):
        calls.clear()
        leaves = [t.clone().requires_grad_(True) for t in (x0, *As, *Bs)]
        x, la, lb = leaves[0], leaves[1:1 + len(ws)], leaves[1 + len(ws):]
        with reuse_dequantised(reuse):
            ys = (lora_linear_group(x, ws, la, lb, 0.5) if grouped
                  else [lora_linear(x, w, a, b, 0.5) for w, a, b in zip(ws, la, lb, strict=True)])
        assert not reusing_dequantised()
        nodes = {_op_node(y) for y in ys}
        kept = [k for node in nodes for k in (node.kept if grouped else [node.kept])]
        assert sum(k is not None for k in kept) == (2 if reuse else 0)  # the two NF4 weights, never the dense one
        assert all(k is None or k.dtype == dtype and k.shape == (OUT, IN) for k in kept)
        assert len(calls) == 2  # forward: one per NF4 weight
        torch.autograd.backward(ys, dys)
        assert len(calls) == (2 if reuse else 4)  # backward dequantises again only without reuse
        assert all(node.kept is None for node in nodes)  # dropped by backward
        runs[reuse] = [y.detach() for y in ys] + [t.grad for t in leaves]
    for got, want in zip(runs[True], runs[False], strict=True):
        assert torch.equal(got, want)


def test_reuse_dequantised_is_reset_after_an_exception():
    assert not reusing_dequantised()
    with pytest.raises(RuntimeError, match="inside"), reuse_dequantised():
        assert reusing_dequantised()
        with reuse_dequantised(False):
            assert not reusing_dequantised()
        assert reusing_dequantised()  # nested: the outer setting comes back
        raise RuntimeError("inside")
    assert not reusing_dequantised()
