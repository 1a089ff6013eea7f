import pytest
import torch

from kernels.ops.rope import apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq
from kernels.ops.testing import assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol, why). Reference: float64 with the same fp32 cos/sin tables.
TOLERANCES = {
    torch.float32: (1e-6, 1e-5, "two fp32 products and a sum per element"),
    torch.bfloat16: (1.6e-2, 8e-3, "one bf16 rounding of the result (rel. step 3.9e-3), x2 margin"),
    torch.float16: (2e-3, 1e-3, "one fp16 rounding of the result (rel. step 4.9e-4), x2 margin"),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(torch.float16, marks=pytest.mark.gpu),
]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _packed_positions(bsz, seq, g):
    # Packing: positions restart at 0 at random document boundaries, plus large offsets to exercise scaling.
    pos = torch.empty(bsz, seq, dtype=torch.long)
    for b in range(bsz):
        cuts = sorted(torch.randint(1, max(seq, 2), (2,), generator=g).tolist())
        start = int(torch.randint(0, 20000, (1,), generator=g))
        p = torch.arange(seq) + start
        for c in cuts:
            p[c:] = torch.arange(seq - c)
        pos[b] = p
    return pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bsz", "seq", "n_q", "n_k", "dim"), [(1, 1, 1, 1, 2), (2, 7, 4, 2, 64), (1, 33, 3, 1, 10)])
def test_rope_matches_reference(bsz, seq, n_q, n_k, dim, dtype):
    atol, rtol, _ = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(0)
    pos = _packed_positions(bsz, seq, g).to(DEVICE)
    cos, sin = rope_cos_sin(pos, dim, 500000.0, LLAMA3_SCALING)
    q0 = torch.randn(bsz, seq, n_q, dim, generator=g).to(DEVICE, dtype).requires_grad_(True)
    k0 = torch.randn(bsz, seq, n_k, dim, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dq = torch.randn(q0.shape, generator=g).to(DEVICE, dtype)
    dk = torch.randn(k0.shape, generator=g).to(DEVICE, dtype)
    q, k = q0 * 1, k0 * 1  # non-leaf copies: the op rotates them in place
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    torch.autograd.backward([q_rot, k_rot], [dq, dk])

    q64 = q0.detach().double().requires_grad_(True)
    k64 = k0.detach().double().requires_grad_(True)
    rq, rk = apply_rope_reference(q64, k64, cos, sin)
    torch.autograd.backward([rq, rk], [dq.double(), dk.double()])
    assert q_rot.dtype == dtype
    assert_close_verbose(q_rot, rq, atol, rtol, f"rope q {dtype}")
    assert_close_verbose(k_rot, rk, atol, rtol, f"rope k {dtype}")
    assert_close_verbose(q0.grad, q64.grad, atol, rtol, f"rope dq {dtype}")
    assert_close_verbose(k0.grad, k64.grad, atol, rtol, f"rope dk {dtype}")


def test_rope_in_place_on_fused_qkv_view():
    # q/k as strided views of a fused qkv projection output [B, S, (Hq + 2 Hk) * D].
    bsz, seq, n_q, n_k, dim = 2, 5, 4, 2, 16
    qkv0 = torch.randn(bsz, seq, (n_q + 2 * n_k) * dim, device=DEVICE, requires_grad=True)
    qkv = qkv0 * 1
    # Slicing, not split()/chunk(): autograd forbids in-place writes to outputs of multi-view functions.
    qkv4 = qkv.view(bsz, seq, n_q + 2 * n_k, dim)
    q, k = qkv4[:, :, :n_q], qkv4[:, :, n_q : n_q + n_k]
    cos, sin = rope_cos_sin(torch.arange(seq, device=DEVICE).expand(bsz, seq), dim)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    orig = qkv0.detach().double().view(bsz, seq, n_q + 2 * n_k, dim)
    ref_q, ref_k = apply_rope_reference(orig[:, :, :n_q], orig[:, :, n_q : n_q + n_k], cos, sin)
    assert_close_verbose(q_rot, ref_q, 1e-6, 1e-5, "strided q")
    assert_close_verbose(k_rot, ref_k, 1e-6, 1e-5, "strided k")
    assert q_rot.data_ptr() == q.data_ptr()  # the qkv storage itself was rotated
    assert_close_verbose(qkv[..., : n_q * dim].reshape(q.shape), ref_q, 1e-6, 1e-5, "qkv storage")
    # Gradient reaching qkv0: inverse rotation for the q/k parts, identity for v.
    g = torch.randn(qkv.shape, device=DEVICE)
    qkv.backward(g)
    g4 = g.view(bsz, seq, n_q + 2 * n_k, dim).double()
    sin_inv = -sin
    exp_q, exp_k = apply_rope_reference(g4[:, :, :n_q], g4[:, :, n_q : n_q + n_k], cos, sin_inv)
    expected = torch.cat([exp_q, exp_k, g4[:, :, n_q + n_k :]], dim=2).reshape(qkv.shape)
    assert_close_verbose(qkv0.grad, expected, 1e-6, 1e-5, "grad through strided in-place rope")


def test_rope_broadcast_cos_sin_over_batch():
    q = torch.randn(3, 6, 2, 8, device=DEVICE)
    k = torch.randn(3, 6, 1, 8, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(6, device=DEVICE), 8)  # [1, S, D]
    rq, rk = apply_rope_reference(q.double(), k.double(), cos, sin)
    q_rot, k_rot = apply_rope(q.clone(), k.clone(), cos, sin)
    assert_close_verbose(q_rot, rq, 1e-6, 1e-5, "broadcast q")
    assert_close_verbose(k_rot, rk, 1e-6, 1e-5, "broadcast k")


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_inv_freq_matches_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling is not None:
        rope_parameters.update(scaling)
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )  # fmt: skip
    if scaling is None:  # HF's default init is this one line
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    assert torch.equal(rope_inv_freq(128, 500000.0, scaling), expected)


def test_cos_sin_match_transformers_rotary_embedding():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope_parameters = {"rope_theta": 500000.0, **LLAMA3_SCALING}
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )  # fmt: skip
    pos = _packed_positions(2, 9, torch.Generator().manual_seed(1))
    x = torch.randn(2, 9, 32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(x, pos)
    cos, sin = rope_cos_sin(pos, 32, 500000.0, LLAMA3_SCALING)
    assert_close_verbose(cos, hf_cos, 0, 0, "cos vs HF")
    assert_close_verbose(sin, hf_sin, 0, 0, "sin vs HF")
    # And the rotation convention: HF works on [B, H, S, D].
    q = torch.randn(2, 9, 2, 32)
    k = torch.randn(2, 9, 1, 32)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    oq, ok = apply_rope(q.clone(), k.clone(), cos, sin)
    assert_close_verbose(oq, hq.transpose(1, 2), 1e-6, 1e-5, "q vs HF")
    assert_close_verbose(ok, hk.transpose(1, 2), 1e-6, 1e-5, "k vs HF")


def test_rope_in_place_on_views_of_fused_op_outputs():
    # The trainer's pattern: q = q_proj(x).view(B, S, H, D) where q_proj is our lora_linear (a custom Function),
    # then in-place RoPE. Autograd forbids in-place writes to views created *inside* a Function, so the ops
    # must reshape outside their Functions; this guards that.
    from kernels.ops.lora_linear import lora_linear
    from kernels.ops.rms_norm import rms_norm

    bsz, seq, heads, dim, hidden = 2, 3, 2, 8, 16
    x = torch.randn(bsz, seq, hidden, device=DEVICE, requires_grad=True)
    a = torch.randn(4, hidden, device=DEVICE, requires_grad=True)
    b = torch.randn(heads * dim, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(heads * dim, hidden, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(seq, device=DEVICE)[None], dim)
    normed = rms_norm(x, torch.ones(hidden, device=DEVICE))
    q = lora_linear(normed, w, a, b, 1.0).view(bsz, seq, heads, dim)
    k = rms_norm(x, torch.ones(hidden, device=DEVICE)).view(bsz, seq, heads, dim)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    (q_rot.square().sum() + k_rot.sum()).backward()
    assert x.grad is not None and a.grad is not None and torch.isfinite(x.grad).all()
