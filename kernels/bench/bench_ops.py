"""Micro-benchmarks of the fused ops against PyTorch eager (HF-style) at Llama-3.1-8B shapes, on one GPU.

Run (H100, from the repo root)::

    python -m kernels.bench.bench_ops --out results/kernels_bench_h100
    python -m kernels.bench.bench_ops --ops rms_norm swiglu --out /tmp/quick

Writes ``<out>.json`` (one row per op/provider/mode) and ``<out>.md`` (the same as a table). Timing is
``triton.testing.do_bench`` (median with p20/p80 over repetitions, L2 flushed between runs). Memory-bound ops
report GB/s of their *minimal* traffic (each input read once, each output written once) so the number can be
compared with the ~3.0 TB/s copy ceiling; matmul-bound ops report TFLOP/s against ~800 TFLOP/s bf16.
An op that fails (OOM, compile error) is recorded with its error and the others still run. Exits 0 printing
"needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from kernels.ops.fused_linear_logprobs import fused_linear_logprobs
from kernels.ops.lora_linear import lora_linear, lora_linear_group
from kernels.ops.nf4 import dequantize_nf4, dequantize_nf4_forward, dequantize_nf4_reference, quantize_nf4
from kernels.ops.rms_norm import rms_norm
from kernels.ops.rope import apply_rope, rope_cos_sin
from kernels.ops.swiglu import geglu, swiglu

# Llama-3.1-8B, micro-batch 2 x seq 2048.
TOKENS, HIDDEN, INTERMEDIATE, VOCAB = 4096, 4096, 14336, 128256
# Gemma-2-9B's head: hidden 3584, vocabulary 256000, final logit soft cap 30
GEMMA_HIDDEN, GEMMA_VOCAB, GEMMA_CAP = 3584, 256000, 30.0
N_HEADS, N_KV_HEADS, HEAD_DIM, LORA_RANK = 32, 8, 128, 16
DTYPE = torch.bfloat16
BF16 = 2  # bytes


def bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Median, p20 and p80 milliseconds of ``fn`` (``triton.testing.do_bench``)."""
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return {"ms": med, "ms_p20": p20, "ms_p80": p80}


def _fwd_bwd(fwd: Callable[[], torch.Tensor | tuple], grads: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        out = fwd()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), list(grads()) if grads() is not None else None)

    return run


# ---- per-op setups: each returns a list of (provider, mode, fn, grad_to_none, bytes, flops) ----------------


def _rms_norm_cases() -> list[tuple]:
    def eager(x, w, eps, residual):  # HF LlamaRMSNorm after the residual add
        h = x + residual
        hf = h.float()
        y = w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return y, h

    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.ones(HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    act = TOKENS * HIDDEN * BF16
    fwd_bytes = 4 * act  # read x, r; write y, h
    bwd_bytes = 4 * act  # read dy, dh, h; write dx (dres aliases dx)
    cases = []
    for name, fn in (("torch", eager), ("ours", rms_norm)):
        cases.append((name, "fwd", lambda fn=fn: fn(x, w, 1e-5, r), None, fwd_bytes, 0))
        cases.append(
            (name, "fwd+bwd", _fwd_bwd(lambda fn=fn: fn(x, w, 1e-5, r), lambda: (dy, dh)), [x, r, w],
             fwd_bytes + bwd_bytes, 0)
        )  # fmt: skip
    return cases


def _gated_cases(ours: Callable, eager_act: Callable) -> Callable[[], list[tuple]]:
    def cases_() -> list[tuple]:
        g = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=DTYPE, requires_grad=True)
        u = torch.randn_like(g, requires_grad=True)
        do = torch.randn_like(g)
        act = TOKENS * INTERMEDIATE * BF16
        cases = []
        for name, fn in (("torch", lambda a, b: eager_act(a) * b), ("ours", ours)):
            cases.append((name, "fwd", lambda fn=fn: fn(g, u), None, 3 * act, 0))
            cases.append((name, "fwd+bwd", _fwd_bwd(lambda fn=fn: fn(g, u), lambda: (do,)), [g, u], 8 * act, 0))
        return cases

    return cases_


def _rope_cases() -> list[tuple]:
    pos = torch.arange(TOKENS // 2, device="cuda").repeat(2, 1)
    cos, sin = rope_cos_sin(pos, HEAD_DIM, 500000.0)
    q0 = torch.randn(2, TOKENS // 2, N_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
    k0 = torch.randn(2, TOKENS // 2, N_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
    dq, dk = torch.randn_like(q0), torch.randn_like(k0)
    cos_b, sin_b = cos.to(DTYPE).unsqueeze(2), sin.to(DTYPE).unsqueeze(2)

    def eager(q, k, *_):  # HF apply_rotary_pos_emb (cos/sin already in the activation dtype)
        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)

        return q * cos_b + rot(q) * sin_b, k * cos_b + rot(k) * sin_b

    qk = (q0.numel() + k0.numel()) * BF16
    cases = []
    for name, fn in (("torch", eager), ("ours", apply_rope)):
        # Both include a clone of q/k (the fused op works in place on a non-leaf): +2 x qk bytes each.
        fwd = lambda fn=fn: fn(q0.clone(), k0.clone(), cos, sin)  # noqa: E731
        cases.append((name, "fwd", fwd, None, 2 * qk, 0))
        cases.append((name, "fwd+bwd", _fwd_bwd(fwd, lambda: (dq, dk)), [q0, k0], 4 * qk, 0))
    return cases


def _flce_cases(hidden: int = HIDDEN, vocab: int = VOCAB, cap: float | None = None) -> list[tuple]:
    h = torch.randn(TOKENS, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=DTYPE) * hidden**-0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (TOKENS,), device="cuda")

    def eager(h, w, labels):  # HF: bf16 logits, upcast, (Gemma-2: soft cap,) cross_entropy
        logits = (h @ w.t()).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return torch.nn.functional.cross_entropy(logits, labels)

    def ours(h, w, labels):
        return fused_linear_cross_entropy(h, w, labels, softcap=cap)

    gemm = 2 * TOKENS * hidden * vocab
    cases = []
    for name, fn in (("torch", eager), ("ours", ours)):
        # "ours" computes the gradients during forward, so its fwd row already contains ~3 GEMMs.
        cases.append((name, "fwd", lambda fn=fn: fn(h, w, labels), None, 0, gemm if name == "torch" else 3 * gemm))
        cases.append((name, "fwd+bwd", _fwd_bwd(lambda fn=fn: fn(h, w, labels), lambda: None), [h, w], 0, 3 * gemm))
    return cases


def _logprobs_cases() -> list[tuple]:
    """DPO's LM head: label log-probs of every token (frozen head), against eager's fp32 log-softmax + gather."""
    h = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=DTYPE) * HIDDEN**-0.5
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    g = torch.randn(TOKENS, device="cuda")

    def eager(h, w, labels):  # TRL's selective_log_softmax on bf16 logits upcast
        return torch.log_softmax((h @ w.t()).float(), -1).gather(-1, labels[:, None])[:, 0]

    gemm = 2 * TOKENS * HIDDEN * VOCAB
    cases = []
    for name, fn in (("torch", eager), ("ours", fused_linear_logprobs)):
        # ours recomputes the logits in backward: 1 GEMM forward, 2 in backward (eager: 1 + 1)
        cases.append((name, "fwd", lambda fn=fn: fn(h, w, labels), None, 0, gemm))
        cases.append((name, "fwd+bwd", _fwd_bwd(lambda fn=fn: fn(h, w, labels), lambda: (g,)), [h], 0,
                      2 * gemm if name == "torch" else 3 * gemm))
    return cases


def _lora_cases() -> list[tuple]:
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    w = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=DTYPE) * HIDDEN**-0.5
    w_nf4 = quantize_nf4(w)
    a = (torch.randn(LORA_RANK, HIDDEN, device="cuda", dtype=DTYPE) * 0.01).requires_grad_(True)
    b = (torch.randn(INTERMEDIATE, LORA_RANK, device="cuda", dtype=DTYPE) * 0.01).requires_grad_(True)
    dy = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=DTYPE)
    drop = torch.nn.Dropout(0.05)

    def eager(x, w, a, b, scale, dropout_p):  # PEFT LoraLayer.forward
        return torch.nn.functional.linear(x, w) + scale * ((drop(x) @ a.t()) @ b.t())

    base = 2 * TOKENS * HIDDEN * INTERMEDIATE
    lora = 2 * TOKENS * LORA_RANK * (HIDDEN + INTERMEDIATE)
    cases = []
    providers = (("torch", eager, w), ("ours", lora_linear, w), ("ours_qlora", lora_linear, w_nf4))
    for name, fn, weight in providers:
        fwd = lambda fn=fn, weight=weight: fn(x, weight, a, b, 2.0, dropout_p=0.05)  # noqa: E731
        cases.append((name, "fwd", fwd, None, 0, base + lora))
        cases.append((name, "fwd+bwd", _fwd_bwd(fwd, lambda: (dy,)), [x, a, b], 0, 2 * base + 3 * lora))
    return cases


def _lora_qkv_cases() -> list[tuple]:
    """q/k/v of one 8B attention layer with LoRA (the 3 outputs' grads given): PEFT eager, three ``lora_linear``
    calls, one ``lora_linear_group`` call; dense and NF4 bases. fp32 A/B storage, as the trainer keeps them."""
    outs = (N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM)
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    ws = [torch.randn(o, HIDDEN, device="cuda", dtype=DTYPE) * HIDDEN**-0.5 for o in outs]
    ws_nf4 = [quantize_nf4(w) for w in ws]
    As = [(torch.randn(LORA_RANK, HIDDEN, device="cuda") * 0.01).requires_grad_(True) for _ in outs]
    Bs = [(torch.randn(o, LORA_RANK, device="cuda") * 0.01).requires_grad_(True) for o in outs]
    dys = [torch.randn(TOKENS, o, device="cuda", dtype=DTYPE) for o in outs]

    def eager(weights):  # PEFT LoraLayer.forward under autocast, per projection
        return tuple(torch.nn.functional.linear(x, w) + 2.0 * ((x @ a.to(DTYPE).t()) @ b.to(DTYPE).t())
                     for w, a, b in zip(weights, As, Bs, strict=True))

    def single(weights):
        return tuple(lora_linear(x, w, a, b, 2.0) for w, a, b in zip(weights, As, Bs, strict=True))

    def group(weights):
        return tuple(lora_linear_group(x, list(weights), As, Bs, 2.0))

    n_out = sum(outs)
    base, lora = 2 * TOKENS * HIDDEN * n_out, 2 * TOKENS * LORA_RANK * (3 * HIDDEN + n_out)
    cases = []
    for name, fn, weights in (("torch", eager, ws), ("ours_single", single, ws), ("ours_group", group, ws),
                              ("ours_single_qlora", single, ws_nf4), ("ours_group_qlora", group, ws_nf4)):
        fwd = lambda fn=fn, weights=weights: fn(weights)  # noqa: E731
        cases.append((name, "fwd", fwd, None, 0, base + lora))
        cases.append((name, "fwd+bwd", _fwd_bwd(fwd, lambda: dys), [x, *As, *Bs], 0, 2 * base + 3 * lora))
    return cases


def _nf4_cases() -> list[tuple]:
    """torch vs ours at the gate/up/down shape, plus each launch variant of the kernel at three weight shapes
    (down/up 14336 x 4096, q/o 4096 x 4096, k/v 1024 x 4096): ``ours_flat`` is the per-byte kernel,
    ``ours_r{rows}w{warps}{g|s|t}`` the blocked one, the code gathered from L1 (g), selected in registers (s) or
    ``tl.gather``-ed from a register table (t). ~45 timings, well under a minute on an H100."""
    configs = [(r, w, 0) for r in (8, 16, 32, 64) for w in (4, 8)] + [(r, 4, lk) for lk in (1, 2) for r in (16, 32)]
    variants = {"ours_flat": {"flat": True}} | {
        f"ours_r{r}w{w}{'gst'[lk]}": {"flat": False, "rows": r, "num_warps": w, "lookup": lk} for r, w, lk in configs
    }
    cases = []
    for shape in ((INTERMEDIATE, HIDDEN), (HIDDEN, HIDDEN), (N_KV_HEADS * HEAD_DIM, HIDDEN)):
        q = quantize_nf4(torch.randn(shape, device="cuda", dtype=DTYPE))
        n = q.numel()
        nbytes = n // 2 + n // 64 + n * BF16  # packed + absmax_q + output
        tag = "" if shape == (INTERMEDIATE, HIDDEN) else f"@{shape[0]}x{shape[1]}"
        cases.append((f"torch{tag}", "fwd", lambda q=q: dequantize_nf4_reference(q, DTYPE), None, nbytes, 0))
        cases.append((f"ours{tag}", "fwd", lambda q=q: dequantize_nf4(q, DTYPE), None, nbytes, 0))
        for name, cfg in variants.items():
            fn = lambda q=q, cfg=cfg: dequantize_nf4_forward(q, DTYPE, **cfg)  # noqa: E731
            cases.append((f"{name}{tag}", "fwd", fn, None, nbytes, 0))
    return cases


def _attention_cases() -> list[tuple]:
    """Causal grouped-query attention at the 8B heads through each SDPA backend alone (a backend that refuses the
    inputs is an error row): micro-batch 2 x 2,048 and one row of 32,768 tokens (the frontier's long rows).
    FLOPs as the MFU convention counts them (kernels/NOTES.md): forward 2 B H S^2 D, forward and backward 3x that."""
    cases = []
    for batch, seq in ((2, TOKENS // 2), (1, 32768)):
        q = torch.randn(batch, N_HEADS, seq, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
        k, v = (torch.randn(batch, N_KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
                for _ in range(2))
        dout = torch.randn_like(q)
        fwd_flops = 2 * batch * N_HEADS * seq * seq * HEAD_DIM
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def fwd(q=q, k=k, v=v, backend=backend):  # noqa: ANN001, ANN202
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            tag = f"{name}@{batch}x{seq}"
            cases.append((tag, "fwd", fwd, None, 0, fwd_flops))
            cases.append((tag, "fwd+bwd", _fwd_bwd(fwd, lambda dout=dout: (dout,)), [q, k, v], 0, 3 * fwd_flops))
    return cases


OPS: dict[str, Callable[[], list[tuple]]] = {
    "rms_norm": _rms_norm_cases,
    "swiglu": _gated_cases(swiglu, torch.nn.functional.silu),
    "geglu": _gated_cases(geglu, lambda a: torch.nn.functional.gelu(a, approximate="tanh")),
    "rope": _rope_cases,
    "fused_linear_cross_entropy": _flce_cases,
    "fused_linear_cross_entropy_softcap": lambda: _flce_cases(GEMMA_HIDDEN, GEMMA_VOCAB, GEMMA_CAP),
    "fused_linear_logprobs": _logprobs_cases,
    "lora_linear": _lora_cases,
    "lora_qkv": _lora_qkv_cases,
    "nf4_dequant": _nf4_cases,
    "attention": _attention_cases,
}


def run_op(op: str) -> list[dict]:
    """Benchmark every provider/mode of one op; errors become rows with an ``error`` field."""
    rows: list[dict] = []
    try:
        cases = OPS[op]()
    except Exception as exc:  # noqa: BLE001 - record and continue with the next op
        return [{"op": op, "provider": "-", "mode": "-", "error": f"setup: {exc!r}", "trace": traceback.format_exc()}]
    for provider, mode, fn, grad_to_none, nbytes, flops in cases:
        row: dict = {"op": op, "provider": provider, "mode": mode}
        try:
            row.update(bench(fn, grad_to_none))
            if nbytes:
                row["GB/s"] = nbytes / row["ms"] / 1e6
            if flops:
                row["TFLOP/s"] = flops / row["ms"] / 1e9
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the run
            row["error"] = repr(exc)
            row["trace"] = traceback.format_exc()
        rows.append(row)
    del cases
    torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], device: str) -> str:
    """Rows as a Markdown table (errors in the last column)."""
    lines = [
        f"Device: {device}; shapes: tokens {TOKENS}, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}, "
        f"heads {N_HEADS}/{N_KV_HEADS}x{HEAD_DIM}, LoRA r={LORA_RANK}, bf16.",
        "",
        "| op | provider | mode | ms (p20-p80) | GB/s | TFLOP/s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})" if "ms" in r else ""
        gbs = f"{r['GB/s']:.0f}" if "GB/s" in r else ""
        tfl = f"{r['TFLOP/s']:.0f}" if "TFLOP/s" in r else ""
        err = r.get("error", "").replace("|", "/")[:120]
        lines.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {ms} | {gbs} | {tfl} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output path prefix: writes <out>.json and <out>.md")
    parser.add_argument("--ops", nargs="*", choices=sorted(OPS), default=list(OPS), help="subset of ops")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    for op in args.ops:
        print(f"benchmarking {op} ...", flush=True)
        op_rows = run_op(op)
        for r in op_rows:
            status = f"{r['ms']:.3f} ms" if "ms" in r else f"ERROR {r.get('error')}"
            print(f"  {r['provider']:>10} {r['mode']:>8}: {status}", flush=True)
        rows.extend(op_rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "dtype": str(DTYPE)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(rows, device))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
