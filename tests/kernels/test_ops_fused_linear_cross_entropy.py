import pytest
import torch

from kernels.ops.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    shift_labels,
)
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). Reference: float64 logits from the same rounded inputs.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5, "fp32 GEMMs over H <= 96 and fp32 softmax over V <= 3001: a few hundred ulp"),
    torch.bfloat16: (3e-2, 3e-2, "logits and dlogits stored in bf16 (rel. step 3.9e-3) then fed to bf16 GEMMs"),
    torch.float16: (5e-3, 5e-3, "logits and dlogits stored in fp16 (rel. step 4.9e-4) then fed to fp16 GEMMs"),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(torch.float16, marks=pytest.mark.gpu),
]
# (batch, seq, hidden, vocab, chunk): 1 token; vocab not a multiple of the 4096 block and > one block;
# chunk sizes that do not divide the token count.
CASES = [
    (1, 1, 16, 257, None),
    (1, 7, 33, 1000, 3),
    (2, 31, 48, 5003, 16),
    (4, 16, 96, 3001, None),
]


def _inputs(case, dtype, with_bias, seed=0):
    b, s, hdim, vocab, _ = case
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, s, hdim, generator=g).to(DEVICE, dtype)
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(DEVICE, dtype)
    bias = torch.randn(vocab, generator=g).to(DEVICE, dtype) if with_bias else None
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[:, ::4] = -100  # padding / prompt positions
    return h, w, bias, labels.to(DEVICE)


def _loss_and_grads(fn, h, w, bias, labels, upcast, **kw):
    leaves = [t.detach().clone() for t in (h, w, bias) if t is not None]
    if upcast:
        leaves = [t.double() for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    loss = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, **kw)
    (2.5 * loss).backward()  # grad_output != 1 checks the backward scaling
    return loss, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5])  # a cap near the logits' spread bends most of them
def test_flce_matches_reference(case, dtype, with_bias, softcap):
    atol, rtol, _ = TOLERANCES[dtype]
    h, w, bias, labels = _inputs(case, dtype, with_bias)
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, h, w, bias, labels, False, chunk_size=case[4],
                                  softcap=softcap)
    ref, ref_grads = _loss_and_grads(fused_linear_cross_entropy_reference, h, w, bias, labels, True, softcap=softcap)
    assert loss.dtype == torch.float32
    assert_close_verbose(loss, ref, atol, rtol, f"flce loss {case} {dtype}")
    for name, a, e in zip(["dh", "dw", "dbias"], grads, ref_grads, strict=False):
        assert a.dtype == dtype
        assert_close_verbose(a, e, atol, rtol, f"flce {name} {case} {dtype}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_shift_and_reduction(reduction):
    h, w, _, labels = _inputs((2, 9, 32, 700, None), torch.float32, False)
    loss, grads = _loss_and_grads(
        fused_linear_cross_entropy, h, w, None, labels, False, shift=True, reduction=reduction, chunk_size=5
    )
    ref, ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, h, w, None, shift_labels(labels), True, reduction=reduction
    )
    assert_close_verbose(loss, ref, 2e-5, 2e-5, f"flce shifted loss {reduction}")
    for name, a, e in zip(["dh", "dw"], grads, ref_grads, strict=True):
        assert_close_verbose(a, e, 2e-5, 2e-5, f"flce shifted {name} {reduction}")


def test_flce_chunking_does_not_change_mean():
    h, w, _, labels = _inputs((1, 13, 16, 300, None), torch.float32, False)
    losses = [fused_linear_cross_entropy(h, w, labels, chunk_size=c) for c in (1, 4, 13)]
    for c, loss in zip((4, 13), losses[1:], strict=True):
        assert_close_verbose(loss, losses[0], 1e-6, 1e-6, f"chunk {c} vs 1")


def test_flce_all_ignored_is_zero():
    h, w, _, labels = _inputs((1, 5, 16, 100, None), torch.float32, False)
    labels.fill_(-100)
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0


def test_flce_frozen_weight_and_no_grad():
    h, w, _, labels = _inputs((1, 6, 16, 200, None), torch.float32, False)
    h.requires_grad_(True)  # w stays frozen: no grad_W work, no grad on w
    fused_linear_cross_entropy(h, w, labels).backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, labels)
    assert_close_verbose(
        loss, fused_linear_cross_entropy_reference(h.double(), w.double(), labels), 2e-5, 2e-5, "nograd"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_flce_num_items_in_batch_divides_the_sum(as_tensor, dtype):
    """``reduction="sum"`` with ``num_items_in_batch`` (the trainer's loss tokens of a whole optimizer step, here
    more than this micro-batch's own): the loss and every gradient are the reference's sum / num_items, with the
    scale applied in the kernel (grad_output 2.5 still multiplies in backward)."""
    atol, rtol, _ = TOLERANCES[dtype]
    h, w, _, labels = _inputs((2, 9, 32, 700, None), dtype, False)
    n_items = 37  # 12 of the 18 labels bear loss here; the rest belong to other micro-batches of the step
    arg = torch.tensor(float(n_items), device=DEVICE) if as_tensor else n_items
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, h, w, None, labels, False, reduction="sum",
                                  chunk_size=5, num_items_in_batch=arg)
    ref, ref_grads = _loss_and_grads(fused_linear_cross_entropy_reference, h, w, None, labels, True,
                                     reduction="sum", num_items_in_batch=n_items)
    assert_close_verbose(loss, ref, atol, rtol, f"flce loss / num_items {dtype}")
    for name, a, e in zip(["dh", "dw"], grads, ref_grads, strict=True):
        assert a.dtype == dtype
        assert_close_verbose(a, e, atol, rtol, f"flce {name} / num_items {dtype}")


def test_flce_num_items_needs_a_sum():
    h, w, _, labels = _inputs((1, 5, 16, 100, None), torch.float32, False)
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        with pytest.raises(ValueError, match="num_items_in_batch divides a 'sum'"):
            fn(h, w, labels, reduction="mean", num_items_in_batch=3)


def test_flce_softcap_is_gemma2s_capped_head():
    """The capped loss is transformers' Gemma-2 head: ``cap * tanh(logits / cap)`` then cross-entropy (written
    out here, not through the reference), and the cap changes the loss (the switch reaches the kernel)."""
    h, w, _, labels = _inputs((2, 9, 32, 700, None), torch.float32, False)
    h = 4 * h  # logits ~N(0, 16): the cap of 2 saturates many
    logits = (h.double() @ w.double().t()).reshape(-1, 700)
    capped = torch.tanh(logits / 2.0) * 2.0
    want = torch.nn.functional.cross_entropy(capped, labels.reshape(-1), ignore_index=-100)
    got = fused_linear_cross_entropy(h, w, labels, softcap=2.0)
    assert_close_verbose(got, want, 2e-5, 2e-5, "flce softcap against the written-out capped head")
    uncapped = fused_linear_cross_entropy(h, w, labels)
    assert (uncapped - got).abs().item() > 0.1
