"""kernels.trainer.model against transformers: same checkpoint, same logits, for every supported family.

Tolerances: every comparison here runs in float32 on the CPU, where our ops run their float32 PyTorch
references; the two models then differ only in the order of float32 operations (fused residual + norm, SDPA
vs transformers' SDPA call, LoRA added in another order), so logits agree to a few float32 ulps of their size:
``atol = 1e-5`` on logits of magnitude ~1 (measured: < 1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels.ops.nf4 import dequantize_nf4
from kernels.trainer import attention as A
from kernels.trainer.config import DecoderConfig, MethodOptions
from kernels.trainer.loading import configure_allocator, load_model
from kernels.trainer.offload import checkpointed_layer_ids, streamed_layer_ids
from kernels.trainer.opset import FUSED_OPS
from tests.kernels.checkpoints import preset_checkpoints

ATOL = 1e-5
PRESETS = ("tiny-llama", "tiny-mistral", "tiny-qwen2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):  # noqa: ANN001, ANN201
    with preset_checkpoints(tmp_path_factory.mktemp("trainer_model"), PRESETS) as found:
        yield found


def _hf(ckpt):  # noqa: ANN001, ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()


def _ids(seed: int = 0, shape=(2, 37)) -> torch.Tensor:  # noqa: ANN001
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_transformers(checkpoints, preset):  # noqa: ANN001
    ckpt = checkpoints[preset]
    ours = load_model(ckpt, MethodOptions(kind="lora", lora_r=4), dtype=torch.float32, device="cpu").eval()
    ids = _ids()
    with torch.no_grad():
        want = _hf(ckpt)(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cfg = DecoderConfig.from_checkpoint(ckpt)
    if preset == "tiny-qwen2":
        assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings and ours.lm_head is None
        assert ours.model.layers[0].self_attn.q_proj.bias is not None
        assert ours.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the perturbed bias was loaded


def test_llama3_rope_scaling_read(checkpoints):  # noqa: ANN001
    cfg = DecoderConfig.from_checkpoint(checkpoints["tiny-llama"])
    raw = json.loads((checkpoints["tiny-llama"] / "config.json").read_text())
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_theta == (raw.get("rope_parameters") or raw)["rope_theta"] == 500000.0


def test_qlora_matches_dequantised_base(checkpoints):  # noqa: ANN001
    """QLoRA = the base with NF4-rounded projections: equal to transformers with those weights swapped in."""
    ckpt = checkpoints["tiny-llama"]
    ours = load_model(ckpt, MethodOptions(kind="qlora", lora_r=4), dtype=torch.float32, device="cpu").eval()
    hf = _hf(ckpt)
    with torch.no_grad():
        for name, mod in ours.linears():
            hf.get_submodule(name).weight.copy_(dequantize_nf4(mod.qweight, torch.float32))
        ids = _ids(1)
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
    eff = ours.train().effective_settings()
    assert eff["quantization"] == "nf4" and eff["double_quant"] is True and eff["dtype"] == "float32"
    assert all(mod.weight is None for _, mod in ours.linears())  # no dense copy kept


def _bnb_cpu_dequant_broken(bnbf, shape: tuple[int, ...]) -> str | None:
    """Why bitsandbytes' own CPU round trip is wrong at ``shape`` on this machine, or None.

    bitsandbytes 0.50.2's CPU ``dequantize_4bit`` decodes some shapes wrongly on AVX-512 machines (64x176: errors
    of 2.0 on randn data, where NF4's bound is half the widest code gap, 0.152, times the block's absmax). Then
    neither its dequantised weights nor transformers' bnb model are a reference to compare with.
    """
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    err = (bnbf.dequantize_4bit(q, state).float() - w).abs().reshape(-1, 64).amax(1)
    bound = w.reshape(-1, 64).abs().amax(1) * 0.152 + 1e-6
    if bool((err > bound).any()):
        return (f"bitsandbytes' CPU dequantize_4bit is wrong on this machine at shape {tuple(shape)}: round-trip "
                f"error {err.max().item():.3f} over NF4's bound {bound.max().item():.3f}")
    return None


@pytest.mark.parametrize("double_quant", [True, False])
def test_loads_a_bitsandbytes_4bit_checkpoint(checkpoints, tmp_path, double_quant):  # noqa: ANN001
    """A checkpoint transformers saved with bitsandbytes 4-bit weights (bnb's CPU build) trains as QLoRA as is.

    Our model reads bnb's bytes, so it computes transformers' bnb model's function (same dequantised weights,
    float32 matmuls in another order). Against quantising the dense checkpoint ourselves: the same 4-bit
    nibbles; the rare double-quantised absmax index where bnb's search picks a neighbour of the nearest code
    (tests/kernels/test_ops_nf4.py) moves a block's scale by < 1e-4 relative.
    """
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense = checkpoints["tiny-llama"]
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    hf4 = AutoModelForCausalLM.from_pretrained(dense, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    hf4.save_pretrained(tmp_path / "bnb4", max_shard_size="20KB")  # small shards: quant states may land apart
    assert len(list((tmp_path / "bnb4").glob("*.safetensors"))) > 1
    broken = [why for _, m in hf4.named_modules() if hasattr(m, "weight") and hasattr(m.weight, "quant_state")
              if (why := _bnb_cpu_dequant_broken(bnbf, (m.out_features, m.in_features)))]
    if broken:
        pytest.skip(broken[0])
    opts = MethodOptions(kind="qlora", lora_r=4, double_quant=double_quant)
    ours = load_model(tmp_path / "bnb4", opts, dtype=torch.float32, device="cpu").eval()
    ref = load_model(dense, opts, dtype=torch.float32, device="cpu").eval()
    for (name, mod), (_, mref) in zip(ours.linears(), ref.linears(), strict=True):
        assert mod.weight is None and mod.qweight.shape == mref.qweight.shape, name
        assert torch.equal(mod.qweight.packed, mref.qweight.packed), name
        torch.testing.assert_close(dequantize_nf4(mod.qweight, torch.float32),
                                   dequantize_nf4(mref.qweight, torch.float32), rtol=1e-4, atol=0)
        bnb_w = hf4.get_submodule(name).weight
        torch.testing.assert_close(dequantize_nf4(mod.qweight, torch.float32),
                                   bnbf.dequantize_4bit(bnb_w.data, bnb_w.quant_state).float(), rtol=0, atol=0)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf4.eval()(input_ids=ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(ids), ref(ids), atol=1e-3, rtol=0)
    assert ours.train().effective_settings()["double_quant"] is double_quant
    with pytest.raises(ValueError, match="qlora only"):
        load_model(tmp_path / "bnb4", MethodOptions(kind="lora"), dtype=torch.float32, device="cpu")


def test_effective_settings_read_back(checkpoints):  # noqa: ANN001
    ours = load_model(checkpoints["tiny-mistral"], MethodOptions(kind="lora", lora_r=8, lora_alpha=16,
                                                                 target_modules=("q_proj", "v_proj")),
                      dtype=torch.float32, device="cpu")
    eff = ours.effective_settings()
    cfg = ours.cfg
    # q_proj: A [8, H] + B [Hq*D, 8]; v_proj: A [8, H] + B [Hkv*D, 8]
    per_layer = 8 * cfg.hidden_size + cfg.num_heads * cfg.head_dim * 8 + 8 * cfg.hidden_size \
        + cfg.num_kv_heads * cfg.head_dim * 8
    assert eff["trainable_params"] == cfg.num_layers * per_layer
    assert eff | {"trainable_params": 0, "total_params": 0} == {
        "train_mode": True, "gradient_checkpointing": True, "dtype": "float32", "quantization": None,
        "trainable_params": 0, "total_params": 0, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
        "use_dora": False, "target_modules": ["q_proj", "v_proj"]}
    ours.eval()
    assert ours.effective_settings()["gradient_checkpointing"] is False  # eval mode skips checkpointing


CKPT_VARIANTS = {
    "torch-checkpoint": {},
    "offload-inputs": {"offload_checkpoints": True},
    "stream-weights": {"offload_weights": 1, "offload_embeddings": True, "offload_lm_head": True},
    "stream-all": {"offload_weights": -1, "offload_checkpoints": True},
    "recompute-some": {"recompute_layers": 1},
    "recompute-streamed": {"recompute_layers": 1, "offload_weights": 1, "offload_checkpoints": True},
}


@pytest.mark.parametrize("variant", list(CKPT_VARIANTS))
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_checkpointing_and_offload_give_same_gradients(checkpoints, variant, kind):  # noqa: ANN001
    """Checkpointed layers (torch non-reentrant, or our Function with host offloads) == no checkpointing."""
    ckpt = checkpoints["tiny-llama"]  # untied: the embedding / LM-head offloads apply
    grads = {}
    for mode in ("plain", variant):
        torch.manual_seed(0)
        knobs = CKPT_VARIANTS[variant] if mode == variant else {}
        opts = MethodOptions(kind=kind, lora_r=4, lora_dropout=0.1, gradient_checkpointing=mode != "plain", **knobs)
        model = load_model(ckpt, opts, dtype=torch.float32, device="cpu")
        if mode == "stream-weights":
            assert model.streamer is not None and model.streamer.layer_ids == [0]
        calls = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        for _, mod in model.linears():  # non-zero B so every LoRA parameter gets a gradient
            torch.nn.init.normal_(mod.lora_B, std=0.02)
        ids = _ids(2, (2, 21))
        torch.manual_seed(1)  # same dropout masks in both modes (checkpointing replays the RNG state)
        model(ids, labels=ids).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        recomputed = {i for i, c in enumerate(calls) if c == 2}
        assert set(calls) <= {1, 2}
        want = set(range(len(calls))) if mode != "plain" else set()
        if "recompute_layers" in knobs:
            want = {0}  # streamed layer 0 / the evenly spread pick of 1 of 2 layers
        assert recomputed == want, (mode, calls)
    assert grads["plain"].keys() == grads[variant].keys()
    for n in grads["plain"]:
        torch.testing.assert_close(grads[variant][n], grads["plain"][n], atol=1e-6, rtol=1e-5, msg=n)


def test_selective_recomputation_choice():
    def ids(**kw):  # noqa: ANN003, ANN202
        return checkpointed_layer_ids(32, MethodOptions(kind="lora", **kw))

    assert ids() is None and ids(recompute_layers=32) is None  # all: the plain path
    assert ids(recompute_layers=8, gradient_checkpointing=False) is None
    assert ids(recompute_layers=8) == frozenset(range(0, 32, 4))
    # streamed layers (every other one) always recompute; the rest fill up to the count
    got = ids(recompute_layers=20, offload_weights=16)
    assert len(got) == 20 and set(range(0, 32, 2)) <= got
    with pytest.raises(ValueError, match="fewer than the 16 layers"):
        ids(recompute_layers=8, offload_weights=16)
    with pytest.raises(ValueError, match="switch gradient checkpointing off"):
        ids(recompute_layers=0)


def test_streamed_layers_are_spread():
    assert streamed_layer_ids(32, 0) == []
    assert streamed_layer_ids(32, -1) == list(range(32))
    assert streamed_layer_ids(32, 16) == list(range(0, 32, 2))
    ids = streamed_layer_ids(32, 18)
    assert len(ids) == 18 and max(b - a for a, b in zip(ids, ids[1:], strict=False)) <= 2


def test_reference_ops_switch_the_blocks_ops(checkpoints, monkeypatch):  # noqa: ANN001
    """``reference_ops`` puts the named ops' PyTorch references into every block; the rest stay fused."""
    from kernels.ops.rms_norm import rms_norm_reference
    from kernels.ops.swiglu import swiglu

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that "fused" really runs the Triton kernels here
    ckpt = checkpoints["tiny-llama"]
    ids = torch.randint(3, 200, (2, 24))
    losses = []
    for names in ((), ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")):
        model = load_model(ckpt, MethodOptions(kind="full", reference_ops=names), dtype=torch.float32, device="cpu")
        layer = model.model.layers[0]
        assert (layer.input_layernorm.ops.rms_norm is rms_norm_reference) == bool(names)
        assert (layer.mlp.ops.swiglu is swiglu) != bool(names)
        assert (model.ops is FUSED_OPS) != bool(names)
        losses.append(model(ids, labels=ids))
    # same maths in fp32: the Triton kernels (interpreted) and the references agree
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reference_ops"):
        load_model(ckpt, MethodOptions(kind="full", reference_ops=("lora_linear",)), dtype=torch.float32,
                   device="cpu")


@pytest.mark.parametrize(("preset", "kind"), [("tiny-llama", "lora"), ("tiny-qwen2", "lora"), ("tiny-llama", "qlora")])
def test_grouped_projections_give_same_gradients(checkpoints, monkeypatch, preset, kind):  # noqa: ANN001
    """q/k/v and gate/up as one ``lora_linear_group`` call each == one ``lora_linear`` per projection (fp32,
    the ops' autograd Functions under the interpreter; qwen2 brings q/k/v biases); with LoRA dropout the model
    falls back to single calls (PEFT draws a mask per projection)."""
    import sys

    ll = sys.modules["kernels.ops.lora_linear"]  # the module (the package re-exports the function of that name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Functions, not the references, for lora_linear
    calls = {"group": 0}
    real = ll.LoRAGroupFunction.apply
    monkeypatch.setattr(ll.LoRAGroupFunction, "apply", lambda *a: calls.__setitem__("group", calls["group"] + 1)
                        or real(*a))
    refs = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")  # fast: only LoRA runs the Functions
    ids = _ids(3, (2, 19))
    grads, losses = {}, {}
    for group, dropout in ((True, 0.0), (False, 0.0), (True, 0.1)):
        calls["group"] = 0
        opts = MethodOptions(kind=kind, lora_r=4, lora_dropout=dropout, group_projections=group,
                             reference_ops=refs)
        model = load_model(checkpoints[preset], opts, dtype=torch.float32, device="cpu", seed=0)
        for _, mod in model.linears():  # non-zero B so every LoRA parameter gets a gradient
            torch.nn.init.normal_(mod.lora_B, std=0.02, generator=torch.Generator().manual_seed(5))
        loss = model(ids, labels=ids)
        loss.backward()
        n_layers = len(model.model.layers)
        # forward + checkpoint recompute, two groups per layer; none with dropout or without grouping
        assert calls["group"] == (4 * n_layers if group and not dropout else 0), (group, dropout, calls)
        losses[group, dropout] = loss.detach()
        grads[group, dropout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses[True, 0.0], losses[False, 0.0], atol=1e-6, rtol=1e-6)
    assert grads[True, 0.0].keys() == grads[False, 0.0].keys()
    for n, g in grads[True, 0.0].items():
        torch.testing.assert_close(g, grads[False, 0.0][n], atol=1e-6, rtol=1e-5, msg=n)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False, is_causal=None):  # noqa: ANN001, ANN202
    """What torch's flash varlen_attn computes, sample by sample with SDPA (CPU): the test's stand-in for it."""
    assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k
    causal = window_size == (-1, 0) if is_causal is None else is_causal
    assert causal, "the trainer must ask for causal attention"
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) <= max_q
    for a, b in zip(bounds, bounds[1:], strict=False):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            enable_gqa=enable_gqa)
        out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("gqa_arg", [True, False])
def test_packed_varlen_path_matches_block_mask(checkpoints, monkeypatch, gqa_arg):  # noqa: ANN001
    """Packed rows through the varlen branch (cu_seqlens from position_ids, reshapes, GQA by argument or by
    repeating KV heads) == the block-diagonal mask path: same loss and LoRA gradients (fp32). Flash varlen
    itself needs a GPU; a per-sample SDPA stands in for it here."""

    ids = torch.randint(3, 200, (2, 23), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([list(range(9)) + list(range(11)) + [0, 0, 0],  # two samples, then 3 pads
                        list(range(5)) + list(range(18))])
    assert A.packed_cu_seqlens(pos).tolist() == [0, 9, 20, 21, 22, 23, 28, 46]
    out = {}
    for path in ("mask", "varlen"):
        if path == "varlen":
            def fn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), **kw):  # noqa: ANN001, ANN003, ANN202
                assert ("enable_gqa" in kw) == gqa_arg and (gqa_arg or k.shape[1] == q.shape[1])
                return _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, window_size, kw.get("enable_gqa", False))
            monkeypatch.setattr(A, "VARLEN", (fn, {"window_size": (-1, 0)}, gqa_arg))
            monkeypatch.setattr(A, "_varlen_ok", lambda h: True)
        model = load_model(checkpoints["tiny-llama"], MethodOptions(kind="lora", lora_r=4), dtype=torch.float32,
                           device="cpu", seed=0)
        for _, mod in model.linears():
            torch.nn.init.normal_(mod.lora_B, std=0.02, generator=torch.Generator().manual_seed(5))
        loss = model(ids, labels=ids, position_ids=pos)
        loss.backward()
        out[path] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["varlen"][0], out["mask"][0], atol=1e-6, rtol=1e-6)
    for n, g in out["mask"][1].items():
        # fp32 sums in another order (per-sample SDPA vs one masked SDPA): measured <= 1.8e-6 on gradients up to ~6
        torch.testing.assert_close(out["varlen"][1][n], g, atol=1e-5, rtol=1e-5, msg=n)


def test_varlen_signature_detection(monkeypatch):  # noqa: ANN001
    """The causal argument is read from the installed varlen_attn's signature (it moved between releases)."""
    import torch.nn.attention.varlen as tv


    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):  # noqa: ANN001, ANN202, ARG001
        return None

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):  # noqa: ANN001, ANN202, ARG001
        return None

    def unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):  # noqa: ANN001, ANN202, ARG001
        return None

    for fn, want in ((new, ({"window_size": (-1, 0)}, True)), (old, ({"is_causal": True}, False)), (unknown, None)):
        monkeypatch.setattr(tv, "varlen_attn", fn)
        got = A._find_varlen()
        assert (got[1:] if got else None) == want, fn.__name__


@pytest.mark.gpu
def test_packed_varlen_flash_matches_block_mask_on_gpu(checkpoints):  # noqa: ANN001
    """The real flash varlen kernel (bf16) against SDPA with the block mask: same loss to bf16 precision."""

    if A.VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    ids = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(4)).cuda()
    pos = torch.tensor([list(range(30)) + list(range(34)), list(range(64))]).cuda()
    losses = []
    for varlen in (True, False):
        model = load_model(checkpoints["tiny-llama"], MethodOptions(kind="lora", lora_r=4, varlen_attention=varlen),
                           dtype=torch.bfloat16, device="cuda", seed=0)
        losses.append(float(model(ids, labels=ids, position_ids=pos)))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_allocator_configuration(monkeypatch):  # noqa: ANN001
    """Expandable segments by default, graphed runs included; a user's allocator setting is left alone."""

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert configure_allocator(MethodOptions()) == "expandable_segments:True"
    assert calls == ["expandable_segments:True"]
    assert configure_allocator(MethodOptions(cuda_graph=True)) == "expandable_segments:True"
    assert configure_allocator(MethodOptions(expandable_segments=False)) == "default"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert configure_allocator(MethodOptions()) == "user: max_split_size_mb:64"
    assert len(calls) == 2
