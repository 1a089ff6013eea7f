"""MFU convention: hand-computed FLOPs for the Llama-3.1-8B shape."""

from __future__ import annotations

from harness.inputs.models import get_preset
from harness.measuring import flops


def test_matmul_params_8b():
    c = get_preset("llama-3.1-8b").config
    # per layer: q 4096*4096, k,v 4096*1024 each, o 4096*4096, mlp 3*4096*14336; plus lm_head 4096*128256
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
    assert flops.matmul_params(c) == 32 * per_layer + 4096 * 128256  # 7.50e9 (embedding lookup excluded)


def test_lora_vs_full_and_attention():
    c = get_preset("llama-3.1-8b").config
    n = flops.matmul_params(c)
    tokens, s = 4096, 2048
    ctx_sq = 2 * s * s  # two samples of 2048
    attn = 6 * 32 * 4096 * ctx_sq
    assert flops.train_flops(c, "lora", tokens, ctx_sq) == 4 * n * tokens + attn
    assert flops.train_flops(c, "full", tokens, ctx_sq) == 6 * n * tokens + attn


def test_mfu_uses_measured_steps_only():
    c = get_preset("tiny-llama").config
    steps = [{"measured": False, "step_s": 100.0, "tokens": 10, "ctx_tokens_sq": 100},
             {"measured": True, "step_s": 2.0, "tokens": 10, "ctx_tokens_sq": 100}]
    mfu, tflops = flops.mfu(c, "lora", steps, peak_tflops=1.0)
    assert tflops == flops.train_flops(c, "lora", 10, 100) / 2.0 / 1e12
    assert mfu == tflops


def test_peak_table_lookup():
    assert flops.peak_tflops_for("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert flops.peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert flops.peak_tflops_for(None)[0] is None
    assert flops.peak_tflops_for("Some Future GPU")[0] is None
