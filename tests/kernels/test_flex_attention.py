"""The FlexAttention path of soft-capped and sliding-window attention (kernels/trainer/flex.py).

On the CPU FlexAttention runs forward only, uncompiled (it has no CPU backward), so the CPU tests check what the
GPU compiles: the block masks and score modifier give the eager paths' function (fp32, no grad) for a soft cap with
and without a window, GQA, a window shorter than the rows, packed rows (2-3 samples a row) with and without a
window, shared-prompt preference pairs and a custom scale; which layers take the path (:func:`flex_layer`) and what
the model hands them (the flex path forced on for fp32 CPU activations, logits equal to the eager model's); the
unpacked masks made once; the cost model's bytes. The ``gpu`` tests run the compiled kernels in bf16, forward and
backward, against the eager fp32 path, and train tiny-gemma2 through the trainer with the path on and off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.trainer import flex
from kernels.trainer.attention import packed_causal_mask
from kernels.trainer.config import DecoderConfig, MethodOptions, TrainSettings
from kernels.trainer.flex import block_mask, flex_attend, flex_layer, flex_runs
from kernels.trainer.torch_ops import softcap_attention, window_mask

pytestmark = [pytest.mark.skipif(not flex.FLEX_AVAILABLE, reason="this torch has no FlexAttention"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

ROW_SAMPLES = ([30, 35, 15], [50, 30])  # packed rows of 80 tokens: 3 and 2 samples, all longer than the window
WINDOW = 24


def _qkv(b: int = 2, s: int = 80, h: int = 4, kv: int = 2, d: int = 16, q_std: float = 4.0, seed: int = 0,
         dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """q scaled so that scores (std ~q_std at the default scale) reach a cap of 2."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g) * q_std
    k, v = torch.randn(b, kv, s, d, generator=g), torch.randn(b, kv, s, d, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def _packed_positions(rows: tuple[list[int], ...]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, cap: float | None,
           mask: torch.Tensor | None) -> torch.Tensor:
    """What the layers compute without FlexAttention: soft-capped eager attention, or SDPA under a bool mask."""
    if cap is not None:
        return softcap_attention(q, k, v, scale or q.shape[-1] ** -0.5, cap, mask)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def _eager_mask(seq: int, window: int | None, pos: torch.Tensor | None, device: str = "cpu") -> torch.Tensor | None:
    """The bool mask the model builds for these rows (None: plain causal), on ``pos``'s device or ``device``."""
    mask = packed_causal_mask(pos) if pos is not None else None
    if window is None:
        return mask
    return window_mask(pos if pos is not None else torch.arange(seq, device=device)[None], window, mask)


CASES = [(2.0, None, False), (2.0, WINDOW, False), (None, WINDOW, False),
         (2.0, None, True), (2.0, WINDOW, True), (None, WINDOW, True)]


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize(("cap", "window", "packed"), CASES)
def test_flex_forward_equals_the_eager_paths(cap, window, packed, scale):  # noqa: ANN001
    """fp32 forward, 4 query heads over 2 KV heads: the flex path == softcap_attention / masked SDPA; the case's
    cap, window and packing each change the result (so a mask or modifier left out would fail)."""
    q, k, v = _qkv()
    seq = q.shape[2]
    pos = _packed_positions(ROW_SAMPLES) if packed else None
    want = _eager(q, k, v, scale, cap, _eager_mask(seq, window, pos))
    with torch.no_grad():
        got = flex_attend(q, k, v, block_mask(seq, window, "cpu", pos), scale, cap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = _eager(q, k, v, scale, None, None)
    assert float((want - plain).abs().max()) > 1e-2


@pytest.mark.parametrize("window", [None, 8])
def test_flex_forward_of_shared_prompt_pairs(window):  # noqa: ANN001
    """Preference pairs sharing their prompt: the flex mask == :meth:`SharedPrompts.mask` (and its window)."""
    from kernels.trainer.preference import collate_pairs

    pairs = [{"prompt_ids": list(range(10)), "chosen_ids": list(range(12)), "rejected_ids": list(range(9))},
             {"prompt_ids": list(range(7)), "chosen_ids": list(range(5)), "rejected_ids": list(range(14))}]
    b = collate_pairs(pairs, 0, "dpo", "shared_prompt")
    pos, shared = b.position_ids, b.shared
    seq = pos.shape[1]
    q, k, v = _qkv(b=1, s=seq, seed=1)
    mask = shared.mask(pos)
    mask = window_mask(pos, window, mask) if window is not None else mask
    want = softcap_attention(q, k, v, 0.3, 2.0, mask)
    with torch.no_grad():
        got = flex_attend(q, k, v, block_mask(seq, window, "cpu", pos, shared), 0.3, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    packed_only = softcap_attention(q, k, v, 0.3, 2.0, packed_causal_mask(pos))  # rejected would see chosen
    assert float((want - packed_only).abs().max()) > 1e-2


def test_which_layers_take_the_flex_path():
    bf16, cuda = torch.bfloat16, "cuda"
    assert flex_layer(cuda, bf16, True, 50.0, None, 16, available=True)  # soft cap, any length
    assert flex_layer(torch.device("cuda:0"), torch.float16, True, 50.0, 4096, 16, available=True)
    assert flex_layer(cuda, bf16, True, None, 2047, 2048, available=True)  # window shorter than the rows
    assert not flex_layer(cuda, bf16, True, None, 2048, 2048, available=True)  # window covers the rows: flash
    assert not flex_layer(cuda, bf16, True, None, None, 2048, available=True)  # plain causal: flash
    assert not flex_layer("cpu", bf16, True, 50.0, None, 16, available=True)  # no CPU backward
    assert not flex_layer(cuda, torch.float32, True, 50.0, None, 16, available=True)
    assert not flex_layer(cuda, bf16, False, 50.0, None, 16, available=True)  # MethodOptions.flex_attention off
    assert not flex_layer(cuda, bf16, True, 50.0, None, 16, available=False)  # a torch without it
    assert flex_runs(cuda, bf16, True, available=True) and not flex_runs("cpu", bf16, True, available=True)
    assert MethodOptions().flex_attention


def test_unpacked_masks_are_made_once(monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(flex, "_UNPACKED", {})
    a = block_mask(64, 16, "cpu")
    assert block_mask(64, 16, torch.device("cpu")) is a
    assert block_mask(64, None, "cpu") is not a and block_mask(80, 16, "cpu") is not a
    pos = _packed_positions(([40, 24], [64]))
    assert block_mask(64, 16, "cpu", pos) is not block_mask(64, 16, "cpu", pos)  # packed: per forward
    assert len(flex._UNPACKED) == 3


@pytest.mark.usefixtures("one_thread")
def test_the_compiled_kernel_takes_another_cap_and_scale():
    """The process-wide compiled kernel (compiled here on the CPU) called with another cap and scale, then another
    length: each a constant of its own graph (a float that changes between calls would otherwise turn symbolic,
    which flex's score_mod refuses: what the H200 run of these tests showed after the bf16 tests' cap of 50)."""
    flex._compiled.cache_clear()
    torch._dynamo.reset()
    for seq, cap, scale in ((32, 50.0, 0.25), (32, 30.0, 0.25), (48, 30.0, 0.125)):
        q, k, v = _qkv(s=seq, h=2, kv=2, d=16, dtype=torch.float32, device="cpu")
        mask = block_mask(seq, None, "cpu")
        got = flex._compiled()(q, k, v, mask, scale, cap)
        assert _rel(got, flex._attend(q, k, v, mask, scale, cap)) < 1e-5, (seq, cap)
    flex._compiled.cache_clear()
    torch._dynamo.reset()


def test_plan_counts_what_the_flex_path_keeps():
    """Gemma-2-9B at 2 x 2048: the eager path's [B, H, S, S] fp32 scores + probabilities where it runs (CPU, fp32,
    flex off), the flex path's fp32 logsumexp on CUDA in bf16."""
    from kernels.trainer.plan import costs_for

    cfg = DecoderConfig.from_dict({
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "sliding_window": 4096})
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16

    def keep(method: MethodOptions, dtype: torch.dtype = bf16, device: torch.device = cuda) -> int:
        return costs_for(cfg, method, 2, 1, 2048, dtype, device).layers[0].keep_bytes

    flex_keep, eager_keep = keep(MethodOptions()), keep(MethodOptions(flex_attention=False))
    assert eager_keep - flex_keep == 2 * 16 * 2048 * (2048 * (2 * 4 + 2) - 4)
    assert keep(MethodOptions(), device=cpu) == eager_keep
    assert keep(MethodOptions(), torch.float32) - keep(MethodOptions(flex_attention=False), torch.float32) == 0


# -- the model on the flex path ----------------------------------------------------------------------------------

# Gemma-2's caps where they matter at these sizes (tests/kernels/test_families.py: GEMMA2_FUNCTION), queries x8
GEMMA2_FUNCTION = {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.4, "query_pre_attn_scalar": 24}


def _checkpoint(preset: str, out_dir):  # noqa: ANN001, ANN202
    from tests.kernels.checkpoints import perturbed_checkpoint

    if preset != "tiny-gemma2":
        return perturbed_checkpoint(preset, out_dir)

    def scale_queries(name: str, p: torch.nn.Parameter) -> None:
        if name.endswith("q_proj.weight"):
            p.mul_(8.0)

    return perturbed_checkpoint(preset, out_dir, edit=scale_queries, config=GEMMA2_FUNCTION)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):  # noqa: ANN001, ANN201
    from tests.kernels.checkpoints import preset_checkpoints

    with preset_checkpoints(tmp_path_factory.mktemp("flex"), ("tiny-gemma2", "tiny-gemma3"), _checkpoint) as found:
        yield found


def _lora(preset: str, **kw) -> MethodOptions:  # noqa: ANN003
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return MethodOptions(kind="lora", lora_r=4, lora_alpha=8, target_modules=targets, **kw)


def _ids(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _forced(device, dtype, enabled, cap, window, seq) -> bool:  # noqa: ANN001
    """:func:`flex_layer` as on CUDA in bf16, whatever the activations."""
    return flex_layer("cuda", torch.bfloat16, enabled, cap, window, seq, available=True)


# layers on the flex path per forward: (rows of 45 tokens, longer than the 32-token window; rows of 20)
FLEX_CALLS = {"tiny-gemma2": (2, 2), "tiny-gemma3": (1, 0)}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_model_on_the_flex_path_computes_the_eager_model(checkpoints, monkeypatch, preset):  # noqa: ANN001
    """The flex path forced on for fp32 CPU activations (as on CUDA in bf16): logits of unpacked and packed rows
    equal the eager model's, with the expected layers on the path (Gemma-2: both, soft-capped; Gemma-3: its sliding
    layer, when the rows are longer than its window), and the run records it."""
    from kernels.trainer import attention
    from kernels.trainer import model as model_mod
    from kernels.trainer.loading import load_model

    calls = []
    real = attention.flex_attend
    monkeypatch.setattr(attention, "flex_attend", lambda *a: calls.append(1) or real(*a))
    model = load_model(checkpoints[preset], _lora(preset), dtype=torch.float32, device="cpu", seed=0).eval()
    packed, pos = _ids(3, (2, 45)), _packed_positions(([30, 15], [20, 16, 9]))
    for ids, position_ids, n_calls in ((_ids(1, (2, 45)), None, FLEX_CALLS[preset][0]),
                                       (_ids(2, (2, 20)), None, FLEX_CALLS[preset][1]),
                                       (packed, pos, FLEX_CALLS[preset][0])):
        with torch.no_grad():
            want = model(ids, position_ids=position_ids)
            assert not calls
            with monkeypatch.context() as mp:
                mp.setattr(model_mod, "flex_layer", _forced)
                got = model(ids, position_ids=position_ids)
        assert len(calls) == n_calls
        calls.clear()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    monkeypatch.setattr(model_mod, "flex_runs", lambda *a: True)
    assert set(model.family_ops().values()) & {"flex-attention-softcap", "flex-attention (rows longer than the "
                                                                         "window)"}


@pytest.mark.usefixtures("one_thread")
def test_shared_prompt_pairs_on_the_flex_path(checkpoints, monkeypatch):  # noqa: ANN001
    """Gemma-2 preference pairs sharing their prompt (rows longer than its window), the flex path forced on: the
    hidden states equal the eager model's (the pairs' mask and the window, one flex call per layer)."""
    from kernels.trainer import attention
    from kernels.trainer import model as model_mod
    from kernels.trainer.loading import load_model
    from kernels.trainer.preference import collate_pairs

    ids = _ids(4, (1, 60))[0].tolist()
    pairs = [{"prompt_ids": ids[:20], "chosen_ids": ids[20:35], "rejected_ids": ids[35:47]},
             {"prompt_ids": ids[47:54], "chosen_ids": ids[54:60], "rejected_ids": ids[:30]}]
    b = collate_pairs(pairs, 0, "dpo", "shared_prompt")
    model = load_model(checkpoints["tiny-gemma2"], _lora("tiny-gemma2"), dtype=torch.float32, device="cpu",
                       seed=0).eval()
    calls = []
    real = attention.flex_attend
    monkeypatch.setattr(attention, "flex_attend", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = model.hidden_states(b.input_ids, b.position_ids, b.shared)
        monkeypatch.setattr(model_mod, "flex_layer", _forced)
        got = model.hidden_states(b.input_ids, b.position_ids, b.shared)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- GPU: the compiled kernels -----------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("window", [None, 512])
def test_bf16_forward_and_backward_match_eager_fp32_on_gpu(packed, window):  # noqa: ANN001
    """Gemma-2-9B's attention (head_dim 256, 16 heads over 8 KV heads, scale 1/16, cap 50) at 2 x 1024 tokens,
    compiled flex in bf16 against the eager path in fp32 on the same (bf16) inputs: output and dq / dk / dv within
    1.5e-2 in relative norm. Flex keeps the scores in fp32 and rounds P and dS to bf16 for its GEMMs: emulated on
    the CPU that is 2e-3 (output, dv) and 5e-3 (dq, dk) at these shapes, where the eager path run in bf16 (scores
    rounded to bf16 before the cap) is 1.3e-2 and 2.4e-2. Queries scaled so that scores reach the cap (the uncapped
    reference is 0.2 off); the forward without grad (a checkpointed layer's first pass) is bit-identical to the
    forward with grad (its recompute)."""
    cap, scale = 50.0, 256 ** -0.5
    q, k, v = _qkv(b=2, s=1024, h=16, kv=8, d=256, q_std=16.0, dtype=torch.bfloat16, device="cuda")
    pos = _packed_positions(([300, 500, 224], [700, 324])).cuda() if packed else None
    dout = torch.randn_like(q)
    q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, k, v))
    want = softcap_attention(q32, k32, v32, scale, cap, _eager_mask(1024, window, pos, "cuda"))
    want.backward(dout.float())
    qb, kb, vb = (t.clone().requires_grad_(True) for t in (q, k, v))
    mask = block_mask(1024, window, "cuda", pos)
    got = flex_attend(qb, kb, vb, mask, scale, cap)
    got.backward(dout)
    assert got.dtype == torch.bfloat16
    for name, a, b in (("out", got, want), ("dq", qb.grad, q32.grad), ("dk", kb.grad, k32.grad),
                       ("dv", vb.grad, v32.grad)):
        assert _rel(a, b) < 1.5e-2, (name, _rel(a, b))
    with torch.no_grad():
        assert _rel(softcap_attention(q32, k32, v32, scale, None, _eager_mask(1024, window, pos, "cuda")), want) > 0.1
        assert torch.equal(flex_attend(q, k, v, mask, scale, cap), got.detach())


@pytest.mark.gpu
def test_rows_of_many_lengths_compile_a_few_times_on_gpu():
    """Rows whose length changes from call to call (``lengths: uniform`` without packing) recompile the flex
    kernel with dynamic lengths once, not once per length: six lengths, at most three compiled graphs, each
    call within bf16 rounding of the eager fp32 path."""
    from torch._dynamo.utils import counters

    flex._compiled.cache_clear()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for seq in (256, 384, 200, 512, 640, 1000):
        q, k, v = _qkv(s=seq, h=8, kv=4, d=64, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            got = flex_attend(q, k, v, block_mask(seq, WINDOW, "cuda"), None, 2.0)
            want = softcap_attention(q.float(), k.float(), v.float(), 64 ** -0.5, 2.0,
                                     _eager_mask(seq, WINDOW, None).cuda())
        assert _rel(got, want) < 1.5e-2, (seq, _rel(got, want))
    assert counters["stats"]["unique_graphs"] - before <= 3


@pytest.mark.gpu
@pytest.mark.usefixtures("one_thread")
def test_tiny_gemma2_trains_alike_with_flex_on_and_off_on_gpu(checkpoints, monkeypatch):  # noqa: ANN001
    """bf16 LoRA training of tiny-gemma2 (rows of 48 tokens: its 32-token window slides) through the trainer: the
    flex path on (also CUDA-graphed) and off give the same first losses within bf16 rounding; the graphed run builds
    its two block masks (causal, window) once, in its warm-up, not per step."""
    from kernels.trainer import attention
    from kernels.trainer.loading import load_model
    from kernels.trainer.train import train

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, 256, (48,), generator=g).tolist()), "labels": ids}
            for _ in range(4)]
    calls, made = [], []
    real, real_make = attention.flex_attend, flex._flex.create_block_mask
    monkeypatch.setattr(attention, "flex_attend", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(flex._flex, "create_block_mask", lambda *a, **kw: made.append(1) or real_make(*a, **kw))
    monkeypatch.setattr(flex, "_UNPACKED", {})
    losses = {}
    for name, opts in (("flex", {}), ("eager", {"flex_attention": False}), ("graphed", {"cuda_graph": True})):
        calls.clear()
        made.clear()
        flex._UNPACKED.clear()
        model = load_model(checkpoints["tiny-gemma2"], _lora("tiny-gemma2", **opts), dtype=torch.bfloat16,
                           device="cuda", seed=0)
        assert model.family_ops()["attention"] == ("torch-eager-softcap" if name == "eager"
                                                   else "flex-attention-softcap")
        losses[name] = train(model, rows, TrainSettings(micro_batch=2, grad_accum=1, steps=4, lr=1e-3, pad_id=258))
        assert bool(calls) == (name != "eager")
        if name == "graphed":
            assert len(made) == 2, len(made)
    for name in ("eager", "graphed"):
        assert losses[name][0] == pytest.approx(losses["flex"][0], rel=1e-2), losses
        assert losses[name] == pytest.approx(losses["flex"], rel=3e-2), losses
