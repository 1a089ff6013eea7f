"""``attention_backend``: the causal attention of unpacked rows through cuDNN's fused attention first
(:func:`kernels.trainer.attention.causal_sdpa`).

On the CPU: the knob is checked where a scenario names it and where the trainer is configured, a CPU run asks torch
for its own order (the same output as ``auto``, recorded by the kernel torch picks), and the model hands the knob to
every attention layer. The ``gpu`` tests: the cuDNN path against flash attention in bf16, forward and backward at
the 8B model's head shapes (grouped-query, head dim 128), which backend ran (the profiler's kernel names, for
``auto`` too), and training steps of a tiny Llama, eager and as one CUDA graph, against ``auto``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adapters_for_tools.tunebench import TunebenchOverrides, row_problems
from harness.spec.scenario import load_scenario
from kernels.trainer.attention import Attention, causal_sdpa, dense_attention_impl
from kernels.trainer.config import MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.train import train
from tests.kernels.test_trainer_graph import PAD, _rows

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_knob_takes_auto_or_cudnn_only():
    assert MethodOptions(attention_backend="cudnn").attention_backend == "cudnn"
    with pytest.raises(ValueError, match="attention_backend 'flash': one of auto, cudnn"):
        MethodOptions(attention_backend="flash")
    assert TunebenchOverrides.model_validate({"attention_backend": "cudnn"}).attention_backend == "cudnn"
    with pytest.raises(ValueError):
        TunebenchOverrides.model_validate({"attention_backend": "fa3"})


@pytest.mark.parametrize(("device", "backend", "refused"), [("cpu", "cudnn", True), ("cpu", "auto", False),
                                                             ("cuda", "cudnn", False)])
def test_a_scenario_asks_for_cudnn_on_a_cuda_device_only(tmp_path, device, backend, refused):
    p = tmp_path / "s.yaml"
    p.write_text(f"""version: 1
name: s
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: lora, lora_r: 4}}
data: {{seq_len: 16}}
train: {{micro_batch: 1, steps: 2, warmup_steps: 1}}
hardware: {{device: {device}}}
frameworks: [tunebench]
""")
    sc = load_scenario(p)
    found = row_problems(sc, TunebenchOverrides.model_validate({"attention_backend": backend}))
    assert [k for k, _ in found] == ([("attention_backend",)] if refused else [])
    if refused:
        assert "a CUDA device" in found[0][1]


def test_on_a_cpu_cudnn_is_torchs_own_order():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 24, 16, generator=g) for n in (4, 2, 2))
    torch.testing.assert_close(causal_sdpa(q, k, v, "cudnn"), causal_sdpa(q, k, v, "auto"), rtol=0, atol=0)
    assert dense_attention_impl("cudnn", 4, 2, 16, torch.float32, "cpu") == \
        dense_attention_impl("auto", 4, 2, 16, torch.float32, "cpu")
    assert dense_attention_impl("auto", 4, 2, 16, torch.float32, "cpu") in ("sdpa-flash", "sdpa-math")


def test_the_record_names_the_kernel_torchs_dispatcher_picks(monkeypatch):
    """``auto`` is recorded by the kernel torch's own order picks (it differs between torch releases and GPUs)."""
    picks = iter([SDPBackend.CUDNN_ATTENTION.value, SDPBackend.MATH.value])
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: next(picks))
    assert dense_attention_impl("auto", 32, 8, 128, torch.bfloat16, "cpu") == "sdpa-cudnn"
    assert dense_attention_impl("auto", 32, 8, 128, torch.bfloat16, "cpu") == "sdpa-math"


def test_the_model_hands_the_knob_to_every_attention_layer(tiny_llama_fp32):
    model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=8, attention_backend="cudnn"),
                       dtype=torch.float32, device="cpu", seed=0)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers and all(m.attention_backend == "cudnn" for m in layers)


def _qkv_8b(seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, seq, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_()
                 for n in (32, 8, 8))


@pytest.mark.gpu
@cuda
def test_cudnn_attention_matches_flash_forward_and_backward_on_gpu():
    """Both against an fp32 reference on the same bf16 inputs: the cuDNN path is no further from it than twice
    flash's error (both round the output and gradients to bf16 once)."""
    q, k, v = _qkv_8b(1024)
    impl = dense_attention_impl("cudnn", 32, 8, 128, torch.bfloat16, "cuda")
    assert impl in ("sdpa-cudnn", "sdpa-flash (cudnn refused)", "sdpa-efficient (cudnn refused)")
    dout = torch.randn_like(q)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = causal_sdpa(qf, kf, vf, "auto")
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    errs = {}
    for backend in ("flash", "cudnn"):  # flash alone: torch's own order may pick cuDNN too (torch 2.13 on Hopper)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if backend == "flash" else contextlib.nullcontext():
            out = causal_sdpa(q, k, v, "auto" if backend == "flash" else "cudnn")
        grads = torch.autograd.grad(out, (q, k, v), dout)
        errs[backend] = [(a.float() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads),
                                                                             strict=True)]
    for name, e_flash, e_cudnn in zip(("out", "dq", "dk", "dv"), errs["flash"], errs["cudnn"], strict=True):
        assert e_cudnn <= 2 * e_flash + 1e-3, (name, e_cudnn, e_flash, impl)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["auto", "cudnn"])
def test_the_recorded_backend_is_the_kernel_that_ran_on_gpu(backend):
    q, k, v = _qkv_8b(512)
    impl = dense_attention_impl(backend, 32, 8, 128, torch.bfloat16, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        causal_sdpa(q, k, v, backend).sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    assert ("cudnn" in names) == (impl == "sdpa-cudnn"), (impl, names[:2000])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("graphed", [False, True])
def test_training_through_cudnn_attention_matches_auto_on_gpu(tiny_llama_fp32, graphed):
    """Six LoRA steps of a tiny Llama in bf16, eager or as one CUDA graph: the losses of the two backends agree to
    bf16 rounding."""
    def losses(backend: str) -> list[float]:
        torch.manual_seed(0)
        model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=8, lora_alpha=16, recompute_layers=1,
                                                          attention_backend=backend),
                           dtype=torch.bfloat16, device="cuda", seed=0)
        model.options.cuda_graph = graphed
        s = TrainSettings(micro_batch=2, grad_accum=1, steps=6, lr=1e-3, pad_id=PAD)
        return train(model, _rows(2 * s.steps), s, device=torch.device("cuda"))

    assert losses("cudnn") == pytest.approx(losses("auto"), rel=2e-2)
