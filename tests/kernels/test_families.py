"""kernels.trainer on the families beyond Llama (Phi-3, Gemma-2, Mixtral, Qwen3, Gemma-3) against transformers (+ PEFT).

The same checks as the Llama family's (tests/kernels/test_trainer_model.py, test_trainer_save.py), per family, on
its tiny preset with random norms and biases: logits, the loss and every trainable gradient (LoRA and full
fine-tuning) equal transformers' on the same checkpoint; the LoRA init equals PEFT's from the same seed; QLoRA
equals transformers with the NF4-rounded projections swapped in; a few steps lower the loss; what is saved loads
in transformers (+ PEFT) and computes what our model computes.

Tolerances (float32 on the CPU, our ops as their float32 PyTorch references): both sides then differ only in the
order of float32 operations, so logits and losses (magnitude ~1) agree to a few ulps: ``atol = 1e-5`` (measured
< 1e-6); gradients are compared with ``atol = 1e-5, rtol = 1e-4`` (sums over tokens in another order, measured
< 2e-6). Gemma-2 runs transformers' ``eager`` attention: its ``sdpa`` path drops the attention soft-capping.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kernels.ops.nf4 import dequantize_nf4
from kernels.trainer.config import DecoderConfig, MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.save import load_peft_state_dict, peft_state_dict, save_trained
from kernels.trainer.train import train
from tests.kernels.checkpoints import byte_rows, perturbed_checkpoint, preset_checkpoints

ATOL = 1e-5
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}
PRESETS = ("tiny-phi3", "tiny-gemma2", "tiny-mixtral", "tiny-qwen3", "tiny-gemma3", "tiny-qwen3-moe")
# what all-linear means per family (harness.inputs.models.FAMILIES): Mixtral's experts are not linear modules
TARGETS = {
    "tiny-phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "tiny-gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "tiny-mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "tiny-qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "tiny-gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "tiny-qwen3-moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
SEQ = 45  # longer than tiny-gemma2's 32-token window: its sliding layers really slide

pytestmark = pytest.mark.usefixtures("one_thread")


# Gemma-2's caps and score scale where they matter at these sizes: random weights of std 0.02 give attention
# scores ~1e-2 and logits ~0.6, which caps of 50 and 30 leave unchanged to 1e-7 / 1e-4 (a missing cap would pass)
GEMMA2_FUNCTION = {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.4, "query_pre_attn_scalar": 24}


# Gemma-3's global layers with linear RoPE scaling (as its 4B-27B models), its sliding ones unscaled at their own base
GEMMA3_ROPE = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


def _perturbed_checkpoint(preset: str, out_dir, seed: int = 0):  # noqa: ANN001, ANN202
    """:func:`perturbed_checkpoint`; Gemma-2's with :data:`GEMMA2_FUNCTION` and queries scaled up 8x, so that its
    scores reach the cap; Gemma-3's with :data:`GEMMA3_ROPE`; Qwen3-MoE's router without renormalisation."""
    if preset == "tiny-gemma3":
        return perturbed_checkpoint(preset, out_dir, seed, config=GEMMA3_ROPE)
    if preset == "tiny-qwen3-moe":  # transformers' default, unlike Mixtral's router: top-k weights not renormalised
        return perturbed_checkpoint(preset, out_dir, seed, config={"norm_topk_prob": False})
    if preset != "tiny-gemma2":
        return perturbed_checkpoint(preset, out_dir, seed)

    def scale_queries(name: str, p: torch.nn.Parameter) -> None:
        if name.endswith("q_proj.weight"):
            p.mul_(8.0)

    return perturbed_checkpoint(preset, out_dir, seed, edit=scale_queries, config=GEMMA2_FUNCTION)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):  # noqa: ANN001, ANN201
    with preset_checkpoints(tmp_path_factory.mktemp("families"), PRESETS, _perturbed_checkpoint) as found:
        yield found


def _hf(ckpt, dtype=torch.float32, device="cpu"):  # noqa: ANN001, ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager").to(device)


def _ids(seed: int = 0, shape=(2, SEQ)) -> torch.Tensor:  # noqa: ANN001
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _lora(preset: str, **kw) -> MethodOptions:  # noqa: ANN003
    return MethodOptions(kind=kw.pop("kind", "lora"), lora_r=4, lora_alpha=8, target_modules=TARGETS[preset], **kw)


def _peft(hf, preset: str):  # noqa: ANN001, ANN202
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS[preset]), lora_dropout=0.0))


def _randomise_b(model) -> None:  # noqa: ANN001
    """Non-zero LoRA B, so the adapters change the function and every A gets a gradient."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, mod in model.linears():
            if mod.lora_B is not None:
                mod.lora_B.copy_(0.05 * torch.randn(mod.lora_B.shape, generator=g))


@pytest.mark.parametrize("preset", PRESETS)
def test_config_reads_the_family(checkpoints, preset):  # noqa: ANN001
    cfg = DecoderConfig.from_checkpoint(checkpoints[preset])
    if preset == "tiny-phi3":
        assert cfg.fused_qkv and cfg.fused_gate_up and cfg.layer_linear_names()[:2] == ("o_proj", "qkv_proj")
    elif preset == "tiny-gemma2":
        assert (cfg.norm_plus_one, cfg.sandwich_norms, cfg.activation, cfg.tie_word_embeddings) == (
            True, True, "gelu_tanh", True)
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window, cfg.sliding_layers) == (0.5, 0.4, 32, (0,))
        assert cfg.attn_scale == pytest.approx(24 ** -0.5) and cfg.embed_scale == pytest.approx(8.0)
    elif preset == "tiny-gemma3":  # one sliding layer (32-token window, RoPE theta 1e4), one global (1e6)
        assert (cfg.qk_norm, cfg.norm_plus_one, cfg.sandwich_norms, cfg.attn_softcap, cfg.final_softcap) == (
            True, True, True, None, None)
        assert (cfg.sliding_window, cfg.sliding_layers, cfg.rope_theta, cfg.local_rope_theta) == (32, (0,), 1e6, 1e4)
        assert (cfg.rope_scaling, cfg.local_rope_scaling) == ({"rope_type": "linear", "factor": 4.0}, None)
    elif preset == "tiny-qwen3-moe":  # every layer sparse; the experts are moe_intermediate_size wide
        assert (cfg.qk_norm, cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size, cfg.norm_topk_prob) == (
            True, 4, 2, 32, False)
        assert cfg.layer_linear_names() == ("q_proj", "k_proj", "v_proj", "o_proj")
    elif preset == "tiny-qwen3":
        assert (cfg.qk_norm, cfg.tie_word_embeddings, cfg.qkv_bias, cfg.o_bias, cfg.sliding_layers) == (
            True, True, False, False, ())
    else:
        assert (cfg.num_experts, cfg.experts_per_token, cfg.moe) == (4, 2, True)
        assert cfg.layer_linear_names() == ("q_proj", "k_proj", "v_proj", "o_proj")
    ops = load_model(checkpoints[preset], _lora(preset), dtype=torch.float32, device="cpu").family_ops()
    assert ops == {"tiny-phi3": {},
                   "tiny-gemma2": {"attention": "torch-eager-softcap"},
                   "tiny-mixtral": {"moe_experts": "torch-grouped-mm"}, "tiny-qwen3": {},
                   "tiny-qwen3-moe": {"moe_experts": "torch-grouped-mm"},
                   "tiny-gemma3": {"attention_sliding_window": "sdpa-window-mask (rows longer than "
                                                                                 "the window)"}}[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_init_equals_peft(checkpoints, preset):  # noqa: ANN001
    """Same seed, same adapters: our modules are built (and initialised) in transformers' order."""
    ckpt = checkpoints[preset]
    ours = load_model(ckpt, _lora(preset), dtype=torch.float32, device="cpu", seed=0)
    torch.manual_seed(0)
    peft_model = _peft(_hf(ckpt), preset)
    theirs = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours_sd = peft_state_dict(ours)
    assert ours_sd.keys() == theirs.keys()
    for k, v in ours_sd.items():
        assert torch.equal(v, theirs[k]), k


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_logits_loss_and_gradients_match(checkpoints, preset):  # noqa: ANN001
    ckpt = checkpoints[preset]
    ours = load_model(ckpt, _lora(preset), dtype=torch.float32, device="cpu", seed=0)
    _randomise_b(ours)
    peft_model = _peft(_hf(ckpt), preset)
    load_peft_state_dict_into_peft(peft_model, peft_state_dict(ours))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), peft_model.eval()(input_ids=ids).logits, atol=ATOL, rtol=0)
    ours.train()
    peft_model.train()
    loss = ours(ids, labels=ids, reduction="mean")
    want = peft_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=0)
    loss.backward()
    want.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    got = {f"base_model.model.{n}".replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): p.grad
           for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == theirs.keys()
    for n, g in got.items():
        torch.testing.assert_close(g, theirs[n], **GRAD_TOL, msg=n)


def load_peft_state_dict_into_peft(peft_model, sd: dict) -> None:  # noqa: ANN001
    """Our adapter (PEFT's saved key names) into a live PEFT model."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, sd)
    assert not [k for k in result.unexpected_keys if "lora_" in k]


@pytest.mark.parametrize("preset", PRESETS)
def test_full_finetuning_gradients_match(checkpoints, preset):  # noqa: ANN001
    """Every weight trainable: the loss and the gradient of every parameter (embeddings, norms, experts and router
    included) equal transformers', under the same names."""
    ckpt = checkpoints[preset]
    ours = load_model(ckpt, MethodOptions(kind="full", gradient_checkpointing=False), dtype=torch.float32,
                      device="cpu")
    hf = _hf(ckpt).train()
    ids = _ids(1)
    loss = ours(ids, labels=ids, reduction="mean")
    want = hf(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=0)
    loss.backward()
    want.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert got.keys() <= theirs.keys() and set(theirs) - set(got) <= {"lm_head.weight"}  # tied: one tensor
    for n, g in got.items():
        torch.testing.assert_close(g, theirs[n], **GRAD_TOL, msg=n)


@pytest.mark.parametrize("preset", PRESETS)
def test_qlora_matches_dequantised_base(checkpoints, preset):  # noqa: ANN001
    """QLoRA = the base with NF4-rounded projections (Mixtral's experts stay dense, as bitsandbytes leaves them)."""
    ckpt = checkpoints[preset]
    ours = load_model(ckpt, _lora(preset, kind="qlora"), dtype=torch.float32, device="cpu").eval()
    hf = _hf(ckpt).eval()
    with torch.no_grad():
        for name, mod in ours.linears():
            hf.get_submodule(name).weight.copy_(dequantize_nf4(mod.qweight, torch.float32))
        ids = _ids(2)
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
    eff = ours.train().effective_settings()
    assert eff["quantization"] == "nf4" and eff["target_modules"] == sorted(TARGETS[preset])
    assert all(mod.weight is None for _, mod in ours.linears())


def test_packed_rows_attend_within_their_sample_and_window(checkpoints):  # noqa: ANN001
    """Gemma-2 packed rows (block mask with the sliding window and soft-capping): the packed loss is the sum of the
    samples' own losses, one sample longer than the window."""
    ckpt = checkpoints["tiny-gemma2"]
    model = load_model(ckpt, _lora("tiny-gemma2"), dtype=torch.float32, device="cpu", seed=0).eval()
    _randomise_b(model)
    a, b = _ids(3, (1, 40)), _ids(4, (1, 9))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(40), torch.arange(9)])[None]
    labels = packed.clone()
    labels[0, 40] = -100  # a sample's first token is no target of the sample before it
    with torch.no_grad():
        got = model(packed, labels=labels, position_ids=pos)
        want = model(a, labels=a) + model(b, labels=b)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_triton_ops_match_their_references(checkpoints, monkeypatch, preset):  # noqa: ANN001
    """The fused ops (Triton, interpreted) inside each family's blocks == the PyTorch references: RoPE rotating
    Phi-3's q and k in place as slices of one ``qkv_proj`` output, RMSNorm with Gemma-2's fp32 ``1 + weight``,
    SwiGLU on Phi-3's ``gate_up_proj`` halves and on Mixtral's experts, Gemma's GeGLU, the soft-capped fused LM
    head of Gemma-2, LoRA's autograd Functions. Loss and LoRA
    gradients in fp32 (interpreted kernels sum in another order: measured < 1e-6; Gemma-3's gradients reach ~9,
    its scaled embeddings and ``1 + weight`` q/k norms, and their differences ~3e-5, 4e-6 of the largest: the
    absolute tolerance scales with each gradient's largest magnitude)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = _ids(8, (2, 40))
    out = {}
    for refs in ((), ("rms_norm", "rope", "swiglu", "geglu", "fused_linear_cross_entropy")):
        model = load_model(checkpoints[preset], _lora(preset, reference_ops=refs), dtype=torch.float32,
                           device="cpu", seed=0)
        _randomise_b(model)
        loss = model(ids, labels=ids)
        loss.backward()
        out[refs] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (fused_loss, fused), (ref_loss, ref) = out.values()
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-4)
    for n, g in ref.items():
        scale = max(1.0, g.abs().max().item())
        torch.testing.assert_close(fused[n], g, atol=GRAD_TOL["atol"] * scale, rtol=GRAD_TOL["rtol"], msg=n)


def test_scored_logprobs_are_the_capped_logits_log_softmax(checkpoints):  # noqa: ANN001
    """The preference objectives' LM head on Gemma-2 (soft-capped, chunked): log-probs of the targets equal the
    log-softmax of the model's (capped) logits, and gradients flow through the chunks' recomputation."""
    model = load_model(checkpoints["tiny-gemma2"], _lora("tiny-gemma2"), dtype=torch.float32, device="cpu", seed=0)
    _randomise_b(model)
    ids = _ids(10, (2, 40))
    rows = torch.tensor([3, 17, 39, 41, 60, 78])
    targets = ids.reshape(-1)[rows + 1]
    got = model.token_logprobs(ids, rows, targets)
    with torch.no_grad():
        logits = model.eval()(ids).reshape(-1, model.cfg.vocab_size)
    want = torch.log_softmax(logits[rows], dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got.detach(), want, atol=ATOL, rtol=0)
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _trained(ckpt, preset: str, kind: str):  # noqa: ANN001, ANN202
    opts = MethodOptions(kind="full") if kind == "full" else _lora(preset, kind=kind)
    model = load_model(ckpt, opts, dtype=torch.float32, device="cpu", seed=0)
    # lr 1e-2: LoRA B moves far from its init, so a mis-mapped key shows; the same rows each epoch
    losses = train(model, byte_rows(4), TrainSettings(micro_batch=2, grad_accum=1, steps=6, lr=1e-2, pad_id=258))
    return model.eval(), losses


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_training_lowers_the_loss_and_the_adapter_loads_in_peft(checkpoints, tmp_path, preset, kind):  # noqa: ANN001
    from peft import PeftModel

    ckpt = checkpoints[preset]
    ours, losses = _trained(ckpt, preset, kind)
    assert losses[-1] < losses[0] - 0.05, losses  # two epochs over four rows: the second is lower
    assert save_trained(ours, tmp_path, ckpt) == "peft adapter"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS[preset])
    peft_model = PeftModel.from_pretrained(_hf(ckpt), str(tmp_path)).eval()
    ids = _ids(5)
    with torch.no_grad():
        if kind == "lora":
            torch.testing.assert_close(ours(ids), peft_model(input_ids=ids).logits, atol=ATOL, rtol=0)
        else:  # the adapter goes onto the original (unquantised) base: not our NF4 function, but PEFT loads all of it
            again = load_model(ckpt, _lora(preset), dtype=torch.float32, device="cpu")
            load_peft_state_dict(again, peft_state_dict(ours))
            torch.testing.assert_close(again.eval()(ids), peft_model(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_full_checkpoint_loads_in_transformers(checkpoints, tmp_path, preset):  # noqa: ANN001
    ckpt = checkpoints[preset]
    ours, losses = _trained(ckpt, preset, "full")
    assert losses[-1] < losses[0]
    assert save_trained(ours, tmp_path, ckpt) == "hf checkpoint"
    hf = _hf(tmp_path).eval()
    ids = _ids(6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
        assert not torch.allclose(_hf(ckpt)(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("preset", PRESETS)
def test_plan_counts_the_family_weights(checkpoints, preset):  # noqa: ANN001
    """The planner's cost model counts one layer's frozen weights as the loaded model holds them (fused projections,
    Gemma-2's four norms, Mixtral's and Qwen3-MoE's dense experts and router), and the trainable LoRA state."""
    from kernels.trainer.plan import costs_for

    ckpt = checkpoints[preset]
    opts = _lora(preset)
    model = load_model(ckpt, opts, dtype=torch.float32, device="cpu", seed=0)
    m = costs_for(model.cfg, opts, 1, 1, 64, torch.float32, torch.device("cpu"))
    layer = model.model.layers[0]
    frozen = sum(p.numel() * 4 for n, p in layer.named_parameters() if not p.requires_grad and "norm" not in n)
    assert m.layers[0].weight_bytes == frozen
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert m.trainable_state_bytes == lora * 4 * 3  # fp32 gradients, Adam's m and v
    assert m.can_stream is not model.cfg.moe  # streamed layers are dense ones


def test_unsupported_parts_say_so():
    base = {"model_type": "phi3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(NotImplementedError, match="partial_rotary_factor"):
        DecoderConfig.from_dict(base | {"partial_rotary_factor": 0.75})
    with pytest.raises(NotImplementedError, match="resid_pdrop"):
        DecoderConfig.from_dict(base | {"resid_pdrop": 0.1})
    with pytest.raises(NotImplementedError, match="'falcon'"):
        DecoderConfig.from_dict(base | {"model_type": "falcon"})
    with pytest.raises(NotImplementedError, match="gemma3_text: use_bidirectional_attention"):
        DecoderConfig.from_dict(base | {"model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        DecoderConfig.from_dict(base | {"model_type": "mixtral", "output_router_logits": True})
    qwen_moe = base | {"model_type": "qwen3_moe", "moe_intermediate_size": 8, "num_experts": 4}
    with pytest.raises(NotImplementedError, match="qwen3_moe: dense layers among the sparse ones"):
        DecoderConfig.from_dict(qwen_moe | {"mlp_only_layers": [0]})
    with pytest.raises(NotImplementedError, match="qwen3_moe: dense layers among the sparse ones"):
        DecoderConfig.from_dict(qwen_moe | {"decoder_sparse_step": 2})


def _expert_paths(ckpt, device: str, dtype: torch.dtype, monkeypatch) -> dict:  # noqa: ANN001
    """Loss and gradients of full fine-tuning through Mixtral's grouped-GEMM experts and through the expert loop."""
    from kernels.trainer import moe

    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = _ids(9, (2, 40)).to(device)
    out = {}
    for grouped in (True, False):
        monkeypatch.setattr(moe.Experts, "grouped", grouped)
        calls.clear()
        model = load_model(ckpt, MethodOptions(kind="full", gradient_checkpointing=False), dtype=dtype, device=device)
        loss = model(ids, labels=ids, reduction="mean")
        loss.backward()
        assert bool(calls) == grouped  # two grouped GEMMs per layer, or none
        out[grouped] = (loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()})
    return out


def test_grouped_experts_equal_the_expert_loop(checkpoints, monkeypatch):  # noqa: ANN001
    """fp32 on the CPU: the same sums in the same order per token, so loss and every gradient agree to fp32
    rounding (GEMMs of other shapes)."""
    out = _expert_paths(checkpoints["tiny-mixtral"], "cpu", torch.float32, monkeypatch)
    torch.testing.assert_close(out[True][0], out[False][0], atol=ATOL, rtol=0)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, **GRAD_TOL, msg=n)


@pytest.mark.gpu
def test_grouped_experts_equal_the_expert_loop_on_gpu(checkpoints, monkeypatch):  # noqa: ANN001
    """bf16 on a Hopper GPU (torch._grouped_mm's CUDA kernel): loss within bf16 rounding of the loop's, gradients
    within 3 % in relative norm (each path rounds its GEMM outputs to bf16 at other tile boundaries)."""
    from kernels.trainer import moe

    x = torch.zeros(1, 64, dtype=torch.bfloat16, device="cuda")
    if not moe.grouped_mm_ok(x, 128):
        pytest.skip("torch._grouped_mm needs a Hopper or newer GPU in bf16")
    out = _expert_paths(checkpoints["tiny-mixtral"], "cuda", torch.bfloat16, monkeypatch)
    assert float(out[True][0]) == pytest.approx(float(out[False][0]), rel=1e-2)
    for n, g in out[False][1].items():
        err = (out[True][1][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert float(err) < 3e-2, (n, float(err))


def test_a_missing_expert_tensor_stops_loading(checkpoints, tmp_path):  # noqa: ANN001
    """Experts arrive one tensor at a time into stacked parameters: one missing is an error, not uninitialised
    memory."""
    from safetensors.torch import load_file, save_file

    src = checkpoints["tiny-mixtral"]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (shard,) = tmp_path.glob("*.safetensors")
    sd = load_file(str(shard))
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in sd  # the layout transformers writes
    del sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_model(tmp_path, _lora("tiny-mixtral"), dtype=torch.float32, device="cpu")


def test_lora_on_experts_is_refused(checkpoints):  # noqa: ANN001
    with pytest.raises(ValueError, match="experts is not built"):
        load_model(checkpoints["tiny-mixtral"], MethodOptions(kind="lora", lora_r=4), dtype=torch.float32,
                   device="cpu")


def _bf16_against_fp32(ckpt, preset: str, device: str) -> None:  # noqa: ANN001
    """Our bf16 model (the Triton kernels, compiled on a GPU) against the exact function: transformers + PEFT in
    fp32 with the same adapters. Logits, loss and LoRA gradients; transformers' own bf16 run is the yardstick of
    what bf16 costs. bf16 keeps 8 bits and each side rounds its own intermediates (ours once per fused op from
    fp32, transformers after each eager op), so logits of magnitude ~1 move by a few bf16 steps (2^-7 at 1): at
    least 99.9 % within 4e-2 and none beyond 8e-2 (Mixtral: 2 of 40,960 at 0.042, where the rounding of a
    token's two expert outputs adds up), and on average no further from fp32 than transformers' bf16 logits are
    (tiny Gemma-3's queries, scaled up by the perturbed checkpoint, make its attention sharp: transformers' bf16
    logits there reach 0.11 from fp32, ours 0.058). Gradients: relative norm of the difference < 5e-2, or at most
    1.25x transformers' bf16 one where that is larger (tiny Gemma-3: theirs up to 0.13, ours up to 0.098). A wrong op
    moves far more logits, and further, and its gradients by an error of order 1."""
    ids = _ids(7, (2, 64)).to(device)
    ours = load_model(ckpt, _lora(preset), dtype=torch.bfloat16, device=device, seed=0)
    _randomise_b(ours)
    adapters = peft_state_dict(ours)
    exact, rounded = (_peft(_hf(ckpt, dt, device), preset) for dt in (torch.float32, torch.bfloat16))
    for m in (exact, rounded):
        load_peft_state_dict_into_peft(m, adapters)
    with torch.no_grad():
        want = exact.eval()(input_ids=ids).logits.float()
        diff = (ours.eval()(ids).float() - want).abs()
        theirs = (rounded.eval()(input_ids=ids).logits.float() - want).abs()
    assert float(diff.max()) <= 8e-2 and float((diff > 4e-2).float().mean()) <= 1e-3, (
        f"max |diff| {float(diff.max()):.4f}, {int((diff > 4e-2).sum())} of {diff.numel()} logits beyond 4e-2")
    assert float(diff.mean()) <= 1.25 * float(theirs.mean()) + 1e-4, (float(diff.mean()), float(theirs.mean()))
    for m in (ours, exact, rounded):
        m.train()
    loss = ours(ids, labels=ids, reduction="mean")
    want_loss = exact(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-2)
    for m_loss in (loss, want_loss, rounded(input_ids=ids, labels=ids).loss):
        m_loss.backward()
    grads, rounded_grads = ({n.replace(".default", ""): p.grad for n, p in m.named_parameters() if p.requires_grad}
                            for m in (exact, rounded))
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        key = f"base_model.model.{n}".replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight")
        ref = grads[key].float()
        err, their_err = ((g.float() - ref).norm() / ref.norm().clamp_min(1e-12)
                          for g in (p.grad, rounded_grads[key]))
        assert float(err) < max(5e-2, 1.25 * float(their_err)), (n, float(err), float(their_err))


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_logits_and_gradients_match_fp32(checkpoints, preset):  # noqa: ANN001
    """bf16 on the CPU (the torch paths the kernels fall back to there)."""
    _bf16_against_fp32(checkpoints[preset], preset, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_logits_and_gradients_match_fp32_on_gpu(checkpoints, preset):  # noqa: ANN001
    """bf16 on the GPU: the Triton kernels compiled, FlexAttention for the windowed and soft-capped layers."""
    _bf16_against_fp32(checkpoints[preset], preset, "cuda")
