"""Step time, tokens/s, peak memory and a CUDA op profile of the tunebench trainer (and the hf baseline).

Each run (method x knobs) trains ``--steps`` optimizer steps in a fresh subprocess, measured by the harness's
``StepMeter`` (device-synchronised step times, NVML per-process / device memory sampled every 10 ms, torch
``max_memory_allocated`` / ``max_memory_reserved`` from before the model is loaded), then ``--profile-steps``
more steps under ``torch.profiler`` (after measuring, so the profiler never inflates the numbers). The
``hf-*`` runs are transformers + PEFT with the model's own loss under bf16 autocast and non-reentrant gradient
checkpointing, i.e. what the HF Trainer runs, in the same process setup, for a same-machine comparison.

The hf loop is this module's own, not ``harness.measuring.handloop``'s: the hand loops deliberately share nothing
with the ``StepMeter`` (they exist to cross-check it) and time each step themselves, while here both
implementations must be measured by the same meter, fed the same collated batches and keep one optimizer across
the measured, phase-memory and profiled steps.

Examples::

    # on the GPU box (Llama-3.1-8B shape, random weights generated once into $TUNEBENCH_CACHE):
    python -m harness.measuring.profile_step --out results/trainer_profile_h100/profile.json
    # a subset, another checkpoint
    python -m harness.measuring.profile_step --runs lora,qlora --checkpoint /data/llama-3.1-8b --out prof.json
    # a fixed plan against the planner's cost model (each tunebench run records ``predicted``: its allocated peak
    # and step at the model's default rates; the summary puts the predicted peak beside the measured one)
    python -m harness.measuring.profile_step --runs lora --seq-len 30720 --micro-batch 1 --steps 4 --warmup 2 \
        --profile-steps 0 --knobs '{"recompute_layers": -1, "offload_weights": -1, "offload_checkpoints": true,
        "offload_lm_head": true, "mlp_chunk_tokens": 8192}' --out results/plan_check/tiled.json
    # smoke test on a CPU
    python -m harness.measuring.profile_step --preset tiny-llama --device cpu --dtype float32 --out /tmp/p.json

Writes ``--out`` (JSON: every run's metrics, per-step times and losses, top-20 ops by device time) and
``<out>.txt`` (the summary table and the profiler tables).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from harness.common.paths import REPO_ROOT
from harness.inputs.models import get_preset, prepare_random_checkpoint
from harness.measuring import environment
from harness.measuring.meter import StepMeter
from kernels.trainer.batches import micro_batches
from kernels.trainer.config import LINEAR_MODULES, DecoderConfig, MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.plan import costs_for, predict
from kernels.trainer.planner import plan_of
from kernels.trainer.train import make_optimizer, train

# name -> (implementation, method, trainer knobs). Memory arithmetic behind the "lean" knobs:
# kernels/trainer/README.md.
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "hf-lora": ("hf", "lora", {}),
    "lora": ("tunebench", "lora", {}),
    "lora-lean16": ("tunebench", "lora", {"offload_weights": 16, "offload_embeddings": True,
                                          "offload_checkpoints": True}),
    "lora-leanall": ("tunebench", "lora", {"offload_weights": -1, "offload_embeddings": True,
                                           "offload_lm_head": True, "offload_checkpoints": True}),
    "hf-qlora": ("hf", "qlora", {}),
    "qlora": ("tunebench", "qlora", {}),
    "qlora-lean": ("tunebench", "qlora", {"offload_embeddings": True, "offload_lm_head": True,
                                          "offload_checkpoints": True}),
}
DEFAULT_RUNS = "hf-lora,lora,lora-lean16,lora-leanall,hf-qlora,qlora,qlora-lean"
GIB = 1024**3


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.measuring.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path (a .txt summary is written beside it)")
    p.add_argument("--preset", default="llama-3.1-8b", help="architecture preset for random weights")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead of a preset")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, from: {', '.join(RUNS)}")
    p.add_argument("--knobs", default="{}", help="JSON dict of extra trainer knobs for every tunebench run")
    p.add_argument("--steps", type=int, default=12, help="measured + warmup optimizer steps")
    p.add_argument("--warmup", type=int, default=4, help="leading steps left out of the statistics")
    p.add_argument("--profile-steps", type=int, default=2, help="extra steps under torch.profiler (0: none)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--timeout-s", type=float, default=420.0, help="per run")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: run one in this process
    p.add_argument("--single-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# one run (in its own process)


def _rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Fixed-length rows of random token ids (every token bears loss except the first), like llama8b_lora."""
    # torch, transformers, peft and the trainer (which imports torch) are heavy: only the runs' own processes
    # load them, never the driver
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 256), (n, seq_len), generator=g)
    return [{"input_ids": r.tolist(), "labels": [-100] + r[1:].tolist()} for r in ids]


def _profile_table(prof, device: str) -> tuple[str, list[dict]]:  # noqa: ANN001
    avgs = prof.key_averages()
    keys = ("device_time_total", "cuda_time_total") if device == "cuda" else ("cpu_time_total",)
    table = ""
    for k in keys:
        try:
            table = avgs.table(sort_by=k, row_limit=20)
            break
        except Exception as e:  # the sort key was renamed between torch releases
            table = f"(profiler table failed for sort_by={k}: {e})"

    def dev_time(e) -> float:  # noqa: ANN001
        for attr in ("device_time_total", "cuda_time_total", "self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, attr, None)
            if v:
                return float(v)
        return 0.0

    rows = sorted(avgs, key=dev_time if device == "cuda" else (lambda e: float(e.cpu_time_total)), reverse=True)
    top = [{"name": e.key, "count": int(e.count), "device_time_total_us": dev_time(e),
            "cpu_time_total_us": float(e.cpu_time_total)} for e in rows[:20]]
    return table, top


def self_times(prof, device: str) -> list[dict]:  # noqa: ANN001
    """Every op or kernel with time of its own (self device time on CUDA, self CPU time otherwise; nested ops' time
    is their children's, so these add up to the profile's total), longest first."""
    def own(e) -> float:  # noqa: ANN001
        if device != "cuda":
            return float(e.self_cpu_time_total)
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    ops = [{"name": e.key, "count": int(e.count), "self_us": own(e)} for e in prof.key_averages()]
    return sorted((o for o in ops if o["self_us"] > 0), key=lambda o: -o["self_us"])


# kinds of kernel by name, the first that matches (cuDNN's attention kernels name sm90 GEMM-like tiles: first)
KINDS = (("attention", r"fmha|flash|sdpa|attention|attn|dot_do_o"),
         ("GEMM", r"nvjet|gemm|cutlass|xmma|cublas|aten::(mm|addmm|bmm|matmul|baddbmm)$"),
         ("RMSNorm", r"rms_norm"), ("SwiGLU / GeGLU", r"gated|swiglu|geglu"), ("RoPE", r"rope"),
         ("cross-entropy", r"cross_entropy|logprob|_ce_"), ("NF4 dequantisation", r"nf4|dequant"),
         ("optimizer", r"adam|multi_tensor|foreach"), ("copies", r"memcpy|memset|copy"),
         ("other elementwise / reductions", r"elementwise|reduce|vectorized|unrolled|aten::"))


def breakdown(ops: list[dict], steps: int) -> list[tuple[str, float]]:
    """Milliseconds a step by kind of kernel (:data:`KINDS`, then ``other``), longest first, from
    :func:`self_times` of ``steps`` profiled steps."""
    total: dict[str, float] = {}
    for o in ops:
        kind = next((k for k, pat in KINDS if re.search(pat, o["name"], re.IGNORECASE)), "other")
        total[kind] = total.get(kind, 0.0) + o["self_us"] / 1000 / max(steps, 1)
    return sorted(total.items(), key=lambda kv: -kv[1])


def _tunebench_model(args, method: str, knobs: dict):  # noqa: ANN001, ANN202
    import torch

    opts = MethodOptions(kind=method, lora_r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=LINEAR_MODULES,
                         gradient_checkpointing=True, **knobs)
    return load_model(args.checkpoint, opts, dtype=getattr(torch, args.dtype), device=args.device)


def _predicted(args, options: MethodOptions) -> dict[str, Any]:  # noqa: ANN001
    """What the planner's cost model (kernels/trainer/plan.py, at its default rates, uncorrected) says of this run's
    knobs: torch's allocated peak and the step, beside what the run measures, so a fixed plan checks the model."""
    import torch

    m = costs_for(DecoderConfig.from_checkpoint(args.checkpoint), options, args.micro_batch, 1, args.seq_len,
                  getattr(torch, args.dtype), torch.device(args.device), optimizer="adamw_torch_fused")
    pr = predict(m, plan_of(options))
    return {"plan": plan_of(options).knobs(), "peak_alloc_gib": pr.peak_bytes / GIB, "step_s": pr.step_s,
            "rates": "the cost model's defaults (a planned run measures them first)"}


def _hf_model(args, method: str):  # noqa: ANN001, ANN202
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kw)
    if method != "qlora":
        model.to(args.device)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _hf_train(model, rows, s, device: str, meter, opt) -> list[float]:  # noqa: ANN001
    """The HF Trainer's inner loop: bf16 autocast, model loss, clip, fused AdamW; the trainer's own batches."""
    import torch

    losses = []
    params = [p for g in opt.param_groups for p in g["params"]]
    dtype = next(p for p in model.parameters()).dtype
    for step in range(s.steps):
        (b,) = micro_batches(rows, s, step, device)  # grad_accum 1
        if meter is not None:
            meter.step_begin()
            meter.count_batch(b)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss)
        if meter is not None:
            meter.step_end(value)
        losses.append(value)
    return losses


def _phase_peaks(model, impl: str, rows: list[dict], s, device: str, opt) -> dict[str, float]:  # noqa: ANN001
    """One more (eager) step with the allocator's peak reset between phases: where the step's memory peak is
    (forward incl. loss, backward incl. recomputation, optimizer), in GiB, and what is allocated between."""
    import torch

    (b,) = micro_batches(rows, s, 0, device)
    out: dict[str, float] = {}

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out[f"after_{name}_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.synchronize()
    out["before_gib"] = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    if impl == "hf":
        with torch.autocast(device, dtype=next(model.parameters()).dtype):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    else:
        n_loss = max(int((b["labels"][:, 1:] != -100).sum()), 1)
        loss = model(b["input_ids"], labels=b["labels"], reduction="sum") / n_loss
    mark("forward")
    loss.backward()
    del loss
    mark("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark("optimizer")
    return out


def run_single(args) -> dict[str, Any]:  # noqa: ANN001
    """One run, measured; returns its result dict (errors included)."""
    import torch

    impl, method, knobs = RUNS[args.single]
    knobs = dict(knobs) | (json.loads(args.knobs) if impl == "tunebench" else {})
    out: dict[str, Any] = {"run": args.single, "impl": impl, "method": method, "knobs": knobs, "ok": False}
    cuda = args.device == "cuda"
    meter = StepMeter(args.warmup, device=args.device, memory_interval_ms=10, total_steps=args.steps)
    try:
        t0 = time.time()
        if impl == "hf":
            model = _hf_model(args, method)
            vocab = model.config.vocab_size
        else:
            model = _tunebench_model(args, method, knobs)
            vocab = model.cfg.vocab_size
            out["effective"] = model.effective_settings()
            out["streamed_layers"] = model.streamer.layer_ids if model.streamer else []
            out["predicted"] = _predicted(args, model.options)
        if cuda:
            torch.cuda.synchronize()
        out["load_s"] = time.time() - t0
        out["after_load_alloc_gib"] = torch.cuda.memory_allocated() / GIB if cuda else None
        n_rows = args.micro_batch * (args.steps + args.profile_steps)
        rows = _rows(n_rows, args.seq_len, vocab)
        s = TrainSettings(micro_batch=args.micro_batch, grad_accum=1, steps=args.steps, lr=2e-4,
                          optimizer="adamw_torch_fused", max_grad_norm=1.0, pad_id=0)
        opt = make_optimizer(model, s)  # one fused AdamW over the trainable parameters, for both
        if impl == "hf":
            out["losses"] = _hf_train(model, rows, s, args.device, meter, opt)
        else:
            out["losses"] = train(model, rows, s, meter=meter, device=torch.device(args.device), optimizer=opt)
        out["metrics"] = meter.finish()
        out["steps"] = meter.steps
        out["ok"] = True
        if cuda and not knobs.get("cuda_graph"):  # a graphed step has no phases to stop between
            out["phase_memory"] = _phase_peaks(model, impl, rows, s, args.device, opt)
        if args.profile_steps > 0:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof_rows = rows[args.micro_batch * args.steps:]
            s.steps = args.profile_steps
            with profile(activities=acts) as prof:
                if impl == "hf":
                    _hf_train(model, prof_rows, s, args.device, None, opt)
                else:
                    train(model, prof_rows, s, device=torch.device(args.device), optimizer=opt)
                if cuda:
                    torch.cuda.synchronize()
            out["profile_table"], out["profile_top20"] = _profile_table(prof, args.device)
            out["profile_ops"] = self_times(prof, args.device)
    except BaseException as e:  # report it, with what was measured so far
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-6000:]
        if "metrics" not in out:
            out["metrics"] = meter.finish()
            out["steps"] = meter.steps
    return out


# ---------------------------------------------------------------------------------------------------------------
# driver


def _prepare_checkpoint(args) -> str:  # noqa: ANN001
    if args.checkpoint:
        return str(Path(args.checkpoint).resolve())
    t0 = time.time()
    path = prepare_random_checkpoint(get_preset(args.preset), args.dtype, 0, device=args.device)
    print(f"checkpoint {path} ({time.time() - t0:.0f} s)", flush=True)
    return str(path)


def _skip_reason(name: str, device: str) -> str | None:
    impl, method, _ = RUNS[name]
    if impl == "hf" and importlib.util.find_spec("peft") is None:
        return "peft not installed"
    if method == "qlora" and impl == "hf" and (device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        return "hf qlora needs bitsandbytes and CUDA"
    return None


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def summary(results: list[dict]) -> str:
    """A Markdown table: speed and memory of every run, relative to the hf run of the same method."""
    base = {r["method"]: r for r in results if r.get("impl") == "hf" and r.get("ok")}
    lines = ["| run | ok | step s (median) | tokens/s | peak alloc GiB | predicted alloc GiB | peak reserved GiB | "
             "NVML proc GiB | tokens/s vs hf | alloc vs hf | load s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("metrics") or {}
        b = (base.get(r.get("method")) or {}).get("metrics") or {}
        tps, btps = m.get("tokens_per_s"), b.get("tokens_per_s")
        al, bal = m.get("peak_alloc_gib"), b.get("peak_alloc_gib")
        lines.append(
            f"| {r['run']} | {'yes' if r.get('ok') else 'NO: ' + str(r.get('error') or r.get('skipped'))[:60]} | "
            f"{_fmt(m.get('step_s_median'), '.3f')} | {_fmt(tps, '.0f')} | {_fmt(al)} | "
            f"{_fmt((r.get('predicted') or {}).get('peak_alloc_gib'))} | "
            f"{_fmt(m.get('peak_reserved_gib'))} | {_fmt(m.get('peak_vram_nvml_gib'))} | "
            f"{_fmt(tps / btps if tps and btps else None, '.2f')}x | "
            f"{_fmt(al / bal if al and bal else None, '.2f')}x | "
            f"{_fmt(r.get('load_s'), '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.single:
        res = run_single(args)
        Path(args.single_out).write_text(json.dumps(res, default=str))
        return 0
    unknown = [r for r in args.runs.split(",") if r and r not in RUNS]
    if unknown:
        print(f"unknown runs {unknown}; known: {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # NVML and torch agree on indices
    args.checkpoint = _prepare_checkpoint(args)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if not k.startswith("single")},
                              "environment": environment.capture() | {"device": args.device}, "runs": results}
    for name in [r for r in args.runs.split(",") if r]:
        why = _skip_reason(name, args.device)
        impl, method, knobs = RUNS[name]
        if why:
            results.append({"run": name, "impl": impl, "method": method, "ok": False, "skipped": why})
            print(f"{name}: skipped ({why})", flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
            single_out = tf.name
        cmd = [sys.executable, "-m", "harness.measuring.profile_step", *(argv if argv is not None else sys.argv[1:]),
               "--checkpoint", args.checkpoint, "--single", name, "--single-out", single_out]
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env,
                                  cwd=str(REPO_ROOT))
            res = json.loads(Path(single_out).read_text()) if Path(single_out).stat().st_size else None
            if res is None:
                res = {"run": name, "impl": impl, "method": method, "ok": False,
                       "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            res = {"run": name, "impl": impl, "method": method, "ok": False, "error": f"timeout {args.timeout_s} s"}
        finally:
            Path(single_out).unlink(missing_ok=True)
        res["wall_s"] = time.time() - t0
        results.append(res)
        m = res.get("metrics") or {}
        print(f"{name}: {'ok' if res.get('ok') else 'FAILED ' + str(res.get('error'))[:300]} "
              f"step {_fmt(m.get('step_s_median'), '.3f')} s, {_fmt(m.get('tokens_per_s'), '.0f')} tok/s, "
              f"peak alloc {_fmt(m.get('peak_alloc_gib'))} GiB, NVML {_fmt(m.get('peak_vram_nvml_gib'))} GiB "
              f"({res['wall_s']:.0f} s)", flush=True)
        out_path.write_text(json.dumps(report, indent=1, default=str))  # after every run: a crash keeps the rest
    table = summary(results)
    print("\n" + table, flush=True)
    text = [table, ""]
    for r in results:
        if r.get("phase_memory"):
            text += [f"## {r['run']}: memory by phase (GiB)",
                     ", ".join(f"{k} {v:.2f}" for k, v in r["phase_memory"].items()), ""]
        if r.get("profile_table"):
            text += [f"## {r['run']}: top 20 ops by device time ({args.profile_steps} steps)", r["profile_table"], ""]
        if r.get("profile_ops"):
            kinds = breakdown(r["profile_ops"], args.profile_steps)
            text += [f"## {r['run']}: time of its own a step by kind of op, ms (all {len(r['profile_ops'])} ops)",
                     ", ".join(f"{k} {v:.1f}" for k, v in kinds) + f"; total {sum(v for _, v in kinds):.1f}", ""]
        if r.get("traceback"):
            text += [f"## {r['run']}: error", r["traceback"], ""]
    out_path.with_suffix(".txt").write_text("\n".join(text))
    out_path.write_text(json.dumps(report | {"summary": table}, indent=1, default=str))
    print(f"wrote {out_path} and {out_path.with_suffix('.txt')}")
    return 0 if any(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
