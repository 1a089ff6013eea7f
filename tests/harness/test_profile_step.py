"""``python -m harness.measuring.profile_step`` (the trainer's step profiler) end to end on the CPU with a tiny
preset: each run in its own process, the same optimizer and batches for hf and tunebench, knobs passed through."""

from __future__ import annotations

import json
import math

import pytest

from harness.measuring import profile_step


@pytest.mark.timeout(600)
def test_profile_step_runs_on_cpu(tmp_path, monkeypatch):  # noqa: ANN001
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' PyTorch references: seconds, not minutes
    out = tmp_path / "prof.json"
    rc = profile_step.main(["--out", str(out), "--device", "cpu", "--dtype", "float32", "--preset", "tiny-llama",
                            "--seq-len", "32", "--micro-batch", "2", "--steps", "3", "--warmup", "1",
                            "--profile-steps", "1", "--runs", "hf-lora,lora,qlora",
                            "--knobs", json.dumps({"group_projections": False, "recompute_layers": 1})])
    assert rc == 0
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"hf-lora", "lora", "qlora"}
    for name, r in runs.items():
        assert r["ok"], (name, r.get("error"))
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"]), name
        assert r["metrics"]["tokens_per_s"] > 0
        assert r["profile_ops"] and all(o["self_us"] > 0 for o in r["profile_ops"]), name
    assert runs["lora"]["knobs"] == {"group_projections": False, "recompute_layers": 1}
    assert "knobs" in runs["hf-lora"] and runs["hf-lora"]["knobs"] == {}  # knobs are for tunebench runs only
    # same checkpoint and batches (LoRA B starts at zero): the first loss is the base model's for both
    assert runs["lora"]["losses"][0] == pytest.approx(runs["hf-lora"]["losses"][0], rel=1e-4)
    assert "| lora |" in out.with_suffix(".txt").read_text()
    # the cost model's word on each tunebench run's knobs, beside what it measured (none for hf)
    pred = runs["lora"]["predicted"]
    assert pred["plan"]["recompute_layers"] == 1 and runs["qlora"]["predicted"]["plan"]["recompute_layers"] == 1
    assert 0 < pred["peak_alloc_gib"] < 1 and pred["step_s"] > 0 and "predicted" not in runs["hf-lora"]
    assert runs["qlora"]["predicted"]["peak_alloc_gib"] != pred["peak_alloc_gib"]  # NF4 weights: another model


def test_the_breakdown_sorts_the_h100_steps_kernels_into_kinds():
    """The 20 longest kernels of the fast-graph LoRA step on the H100 (results/attention_ab-20261206/flash.json), by
    kind: cuDNN's attention is attention though its names read like GEMM tiles."""
    names = {"nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT": "GEMM",
             "nvjet_sm90_tss_32x64_64x16_1x2_h_bz_splitK_NNN": "GEMM",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg...": "attention",
             "void cudnn::fusion::compute_dot_do_o_specialized<tru...": "attention",
             "_gated_fwd_kernel": "SwiGLU / GeGLU", "_rms_norm_bwd_kernel": "RMSNorm", "_rope_kernel": "RoPE",
             "memcpy128": "copies", "void at::native::vectorized_elementwise_kernel<8, at...":
             "other elementwise / reductions", "_nf4_dequant_blocked": "NF4 dequantisation",
             "something new": "other"}
    ops = [{"name": n, "count": 1, "self_us": 1000.0 * (i + 1)} for i, n in enumerate(names)]
    kinds = dict(profile_step.breakdown(ops, steps=2))
    want: dict[str, float] = {}
    for i, kind in enumerate(names.values()):
        want[kind] = want.get(kind, 0.0) + (i + 1) / 2
    assert kinds == pytest.approx(want)
    assert list(kinds) == sorted(kinds, key=lambda k: -kinds[k])
