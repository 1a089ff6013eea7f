"""Model FLOPs and MFU, with the convention stated once, here.

Convention (docs/measurement.md, "MFU"):

- ``N`` = parameters that take part in matrix products per token: every linear layer of the decoder plus
  the LM head. The input embedding is a lookup and is not counted (when embeddings are tied the LM head
  still is, once).
- Forward = 2·N FLOPs per token. Full fine-tuning trains every weight: 6·N (forward 2N, backward 2N for
  activation gradients + 2N for weight gradients). Frozen-base LoRA/QLoRA/DoRA: 4·N (no weight gradients
  of the base; the adapters' own FLOPs are small and not counted).
- Attention (no weights, so the same for every method): forward QK^T and PV cost 4·s·d_attn per token and
  layer for a full s×s score matrix; causal masking halves that, giving 2·s·d_attn. Training = 3x forward.
  Per token: 6·L·s·d_attn with s the length of the sample the token belongs to (we accumulate Σ s² per step).
- Recomputation from gradient checkpointing is NOT counted (that would be hardware FLOPs utilisation).
- Peak: the GPU's dense bf16 tensor-core figure from the table below, or a measured one
  (``python -m harness calibrate``), or ``measure.peak_tflops`` in the scenario.
"""

from __future__ import annotations

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from vendor datasheets
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.2,
    "B200": 2250.0,
}


def peak_tflops_for(gpu_name: str | None) -> tuple[float | None, str]:
    """Table peak for a GPU name (longest matching key wins) and where it came from."""
    if not gpu_name:
        return None, "no GPU"
    best = None
    for key, val in PEAK_BF16_TFLOPS.items():
        if key.lower() in gpu_name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, val)
    if best is None:
        return None, f"no table entry for {gpu_name!r}; run `python -m harness calibrate` or set measure.peak_tflops"
    return best[1], f"datasheet dense bf16 ({best[0]})"


def matmul_params(config: dict) -> int:
    """N: parameters in the decoder's linear layers plus the LM head (embedding lookup excluded)."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * inter
    return layers * (attn + mlp) + h * config["vocab_size"]


def attn_dim(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], heads * hd


def train_flops(config: dict, method: str, tokens: int, ctx_tokens_sq: int) -> float:
    """Model FLOPs of training ``tokens`` tokens whose samples' squared lengths sum to ``ctx_tokens_sq``."""
    n = matmul_params(config)
    per_token = (6 if method == "full" else 4) * n
    layers, d_attn = attn_dim(config)
    # Σ over tokens of s = Σ over samples of s²; training attention = 3 x causal forward (2·s·d per layer)
    attention = 6 * layers * d_attn * ctx_tokens_sq
    return per_token * tokens + attention


def mfu(config: dict, method: str, steps: list[dict], peak_tflops: float | None) -> tuple[float | None, float | None]:
    """(MFU, achieved model TFLOP/s) over the measured steps."""
    measured = [s for s in steps if s["measured"]]
    secs = sum(s["step_s"] for s in measured)
    if not measured or secs <= 0:
        return None, None
    flops = train_flops(config, method, sum(s["tokens"] for s in measured), sum(s["ctx_tokens_sq"] for s in measured))
    achieved = flops / secs / 1e12
    return (achieved / peak_tflops if peak_tflops else None), achieved
