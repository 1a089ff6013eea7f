"""Model FLOPs and MFU, with the convention stated once, here.

Convention (docs/measurement.md, "MFU"):

- ``N`` = parameters that take part in matrix products per token: every linear layer of the decoder plus
  the LM head. The input embedding is a lookup and is not counted (when embeddings are tied the LM head
  still is, once). In a mixture-of-experts layer a token passes through the router and the experts it is
  routed to (``num_experts_per_tok`` of them, plus any shared experts), so only those count: N is the
  *active* parameter count, the figure MoE model cards quote beside the total.
- Forward = 2·N FLOPs per token. Full fine-tuning trains every weight: 6·N (forward 2N, backward 2N for
  activation gradients + 2N for weight gradients). Frozen-base LoRA/QLoRA/DoRA: 4·N (no weight gradients
  of the base; the adapters' own FLOPs are small and not counted).
- Attention (no weights, so the same for every method): forward QK^T and PV cost 2·s·(d_qk + d_v) per token
  and layer for a full s×s score matrix (d_qk = d_v = heads·head_dim, except in DeepSeek's latent attention);
  causal masking halves that. Training = 3x forward. Per token: 3·L·s·(d_qk + d_v), i.e. 6·L·s·d_attn, with s
  the length of the sample the token belongs to (we accumulate Σ s² per step). A sliding-window layer
  (window w) attends to at most w positions: a sample costs s² - (s - w)² there instead of s² when s > w.
- Recomputation from gradient checkpointing is NOT counted (that would be hardware FLOPs utilisation).
- Peak: the GPU's dense bf16 tensor-core figure from the table below, or a measured one
  (``python -m harness calibrate``), or ``measure.peak_tflops`` in the scenario.

The counts read a transformers ``config.json`` of any family of :data:`harness.inputs.models.FAMILIES`, under
the key names transformers 5 writes and those of the published configs (``num_experts`` / ``num_local_experts``).
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
    """N: parameters a token passes through in the decoder's linear layers (of a mixture of experts: the router,
    the shared experts and the ``num_experts_per_tok`` routed ones) plus the LM head (embedding lookup excluded)."""
    layers = config["num_hidden_layers"]
    per_layer = sum(_attention_params(config) + _mlp_params(config, i) for i in range(layers))
    return per_layer + config["hidden_size"] * config["vocab_size"]


def _heads(config: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of standard multi-head / grouped-query attention."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return heads, kv, config.get("head_dim") or config["hidden_size"] // heads


def _attention_params(config: dict) -> int:
    """Weights of one layer's attention projections."""
    mt, h = config.get("model_type"), config["hidden_size"]
    if mt in ("deepseek_v2", "deepseek_v3"):  # latent attention: keys and values through a kv_lora_rank latent
        heads, rope, nope, v = (config["num_attention_heads"], config["qk_rope_head_dim"], config["qk_nope_head_dim"],
                                config["v_head_dim"])
        qk = nope + rope
        q_rank, kv_rank = config.get("q_lora_rank"), config["kv_lora_rank"]
        q = h * q_rank + q_rank * heads * qk if q_rank else h * heads * qk
        return q + h * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * h
    if mt == "falcon":  # one fused query_key_value, then dense
        heads = config["num_attention_heads"]
        hd = h // heads
        if config.get("new_decoder_architecture"):
            kv = config.get("num_kv_heads") or heads
        else:
            kv = 1 if config.get("multi_query", True) else heads
        return h * (heads + 2 * kv) * hd + h * h
    heads, kv, hd = _heads(config)
    return h * heads * hd + 2 * h * kv * hd + heads * hd * h


def _mlp_params(config: dict, layer: int) -> int:
    """Weights of layer ``layer``'s MLP a token passes through (a MoE layer: router, shared and routed experts)."""
    mt, h = config.get("model_type"), config["hidden_size"]
    if mt == "falcon":
        return 2 * h * (config.get("ffn_hidden_size") or 4 * h)
    if mt == "gpt_neox":
        return 2 * h * config["intermediate_size"]
    dense = 3 * h * config["intermediate_size"]  # gate, up, down (SwiGLU / GeGLU; Phi-3 fuses gate and up)
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0
    top_k = config.get("num_experts_per_tok") or 0
    if mt == "mixtral":
        return top_k * dense + h * experts
    if mt in ("qwen2_moe", "qwen3_moe"):
        sparse = (layer not in (config.get("mlp_only_layers") or []) and experts > 0
                  and (layer + 1) % (config.get("decoder_sparse_step") or 1) == 0)
        if not sparse:
            return dense
        moe = top_k * 3 * h * config["moe_intermediate_size"] + h * experts
        if shared := config.get("shared_expert_intermediate_size"):  # qwen2_moe: a gated shared expert
            moe += 3 * h * shared + h
        return moe
    if mt in ("deepseek_v2", "deepseek_v3"):
        if layer < (config.get("first_k_dense_replace") or 0):
            return dense
        per_expert = 3 * h * config["moe_intermediate_size"]
        return (top_k + (config.get("n_shared_experts") or 0)) * per_expert + h * experts
    return dense


def attn_dims(config: dict) -> tuple[int, int, int]:
    """(layers, d_qk, d_v): summed query-key and value widths over heads."""
    layers = config["num_hidden_layers"]
    if config.get("model_type") in ("deepseek_v2", "deepseek_v3"):
        heads = config["num_attention_heads"]
        return layers, heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]), heads * config["v_head_dim"]
    if config.get("model_type") == "falcon":
        return layers, config["hidden_size"], config["hidden_size"]
    heads, _, hd = _heads(config)
    return layers, heads * hd, heads * hd


def layer_windows(config: dict) -> list[int | None]:
    """Each layer's sliding attention window (None: full causal attention).

    From ``layer_types`` where the config lists them (transformers 5 writes it for Gemma, Qwen and others), else by
    the family's rule: Gemma 2 alternates local and global layers, Gemma 3 has one global layer per
    ``sliding_window_pattern``, Mistral, Mixtral and Phi-3 window every layer when ``sliding_window`` is set, Qwen
    the layers from ``max_window_layers`` on when ``use_sliding_window`` is.
    """
    n, w, mt = config["num_hidden_layers"], config.get("sliding_window"), config.get("model_type")
    if not w:
        return [None] * n
    if types := config.get("layer_types"):
        return [w if t == "sliding_attention" else None for t in types]
    if mt == "gemma2":
        return [w if (i + 1) % 2 else None for i in range(n)]
    if mt == "gemma3_text":
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        return [w if (i + 1) % pattern else None for i in range(n)]
    if mt in ("mistral", "mixtral", "phi3"):
        return [w] * n
    if mt in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        first = config.get("max_window_layers", n) if config.get("use_sliding_window") else n
        return [w if i >= first else None for i in range(n)]
    return [None] * n


def attention_flops(config: dict, ctx_tokens_sq: int, samples: int | None = None,
                    max_sample_len: int | None = None) -> float:
    """Training FLOPs of attention over samples whose squared lengths sum to ``ctx_tokens_sq``.

    A sliding-window layer saves (s - w)² per sample longer than its window. The per-sample lengths are not kept,
    only their squares' sum, their number and the longest: the saving is exact when no sample is longer than the
    window (nothing to save) or all samples have one length (the speed scenarios' ``lengths: fixed``); otherwise
    each sample is taken at the root-mean-square length. Without ``samples`` windows are not applied.
    """
    _, d_qk, d_v = attn_dims(config)
    per_sq = 3 * (d_qk + d_v)  # training = 3 x causal forward (s²/2 scores, 2 FLOPs each, QK^T and PV)
    total = 0.0
    for w in layer_windows(config):
        sq = ctx_tokens_sq
        if w and samples and max_sample_len and max_sample_len > w:
            rms = (ctx_tokens_sq / samples) ** 0.5
            sq -= samples * max(0.0, rms - w) ** 2
        total += per_sq * sq
    return total


def train_flops(config: dict, method: str, tokens: int, ctx_tokens_sq: int, samples: int | None = None,
                max_sample_len: int | None = None) -> float:
    """Model FLOPs of training ``tokens`` tokens whose samples' squared lengths sum to ``ctx_tokens_sq``
    (``samples`` and ``max_sample_len`` apply sliding windows: :func:`attention_flops`)."""
    n = matmul_params(config)
    per_token = (6 if method == "full" else 4) * n
    return per_token * tokens + attention_flops(config, ctx_tokens_sq, samples, max_sample_len)


def mfu(config: dict, method: str, steps: list[dict], peak_tflops: float | None) -> tuple[float | None, float | None]:
    """(MFU, achieved model TFLOP/s) over the measured steps."""
    measured = [s for s in steps if s["measured"]]
    secs = sum(s["step_s"] for s in measured)
    if not measured or secs <= 0:
        return None, None
    flops = sum(train_flops(config, method, s["tokens"], s["ctx_tokens_sq"], s.get("samples"), s.get("max_sample_len"))
                for s in measured)
    achieved = flops / secs / 1e12
    return (achieved / peak_tflops if peak_tflops else None), achieved
