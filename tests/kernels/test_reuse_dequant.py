"""QLoRA's ``reuse_dequant``: a recomputing layer's NF4 projections keep the weights they dequantise in the recompute
for the backward that follows (kernels/ops/lora_linear.py, ``reuse_dequantised``; kernels/trainer/offload.py,
``LayerCheckpoint``). The same losses and gradients bit for bit, one dequantisation fewer per weight in each
recomputing layer and none fewer in a layer that keeps its activations, and the switch off again after an error.

The LoRA projections run their autograd Functions (``TRITON_INTERPRET=1``: the interpreted NF4 kernel), the other
ops their PyTorch references (fast).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from kernels.ops.lora_linear import reusing_dequantised
from kernels.trainer.config import MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.train import optimizer_step, prepare_training
from tests.kernels.checkpoints import preset_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
# o_proj and down_proj without an adapter: the frozen NF4 linear (kernels/trainer/linear.py, _NF4Linear)
TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):  # noqa: ANN001, ANN201
    with preset_checkpoints(tmp_path_factory.mktemp("reuse_dequant"), ("tiny-llama",)) as found:
        yield found["tiny-llama"]


@pytest.fixture
def dequant_calls(monkeypatch):  # noqa: ANN001, ANN201
    """Every ``dequantize_nf4`` call of the LoRA ops and of the trainer's linear, by NF4 weight (``id``)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the ops' Functions, not lora_linear's reference
    calls: Counter = Counter()
    for name in ("kernels.ops.lora_linear", "kernels.trainer.linear"):
        mod = sys.modules[name]
        real = mod.dequantize_nf4
        monkeypatch.setattr(mod, "dequantize_nf4",
                            lambda q, dtype=None, real=real: calls.update([id(q)]) or real(q, dtype))
    return calls


def _model(ckpt, reuse: bool, dtype: torch.dtype = torch.float32, **knobs):  # noqa: ANN001, ANN003, ANN202
    opts = MethodOptions(kind="qlora", lora_r=4, target_modules=TARGETS, reuse_dequant=reuse, reference_ops=REFS,
                         **knobs)
    model = load_model(ckpt, opts, dtype=dtype, device="cpu", seed=0)
    for _, mod in model.linears():  # non-zero B so every LoRA parameter gets a gradient
        if mod.lora_B is not None:
            torch.nn.init.normal_(mod.lora_B, std=0.02, generator=torch.Generator().manual_seed(5))
    return model


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(seed))


def _per_layer(model, calls: Counter) -> list[list[int]]:  # noqa: ANN001
    """Dequantisations of each layer's NF4 weights, in module order."""
    return [[calls[id(m.qweight)] for name, m in model.linears() if f"layers.{i}." in name and m.qweight is not None]
            for i in range(len(model.model.layers))]


@pytest.mark.parametrize(("group", "dtype"), [(True, torch.float32), (False, torch.float32),
                                              (True, torch.bfloat16)])
def test_reuse_gives_bitwise_the_same_step(tiny_llama, dequant_calls, group, dtype):  # noqa: ANN001
    """One optimizer step of two micro-batches (every layer recomputes): the same loss, LoRA gradients and
    updated parameters with the switch on and off, and fewer dequantisations with it on."""
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=1)
    out, counts = {}, {}
    for reuse in (False, True):
        model = _model(tiny_llama, reuse, dtype, group_projections=group)
        _, opt, _, params = prepare_training(model, s, "cpu", None)
        batches = [{"input_ids": _ids(k), "labels": _ids(k)} for k in (1, 2)]
        dequant_calls.clear()
        total = optimizer_step(model, batches, 2 * 18 * 2, params, s, opt)
        counts[reuse] = sum(dequant_calls.values())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out[reuse] = (total.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()
                                              if p.requires_grad})
        assert not reusing_dequantised()
    (loss_off, g_off, p_off), (loss_on, g_on, p_on) = out[False], out[True]
    assert torch.equal(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and any(n.endswith("lora_A") for n in g_on)
    for n in g_on:
        assert torch.equal(g_on[n], g_off[n]), n
        assert torch.equal(p_on[n], p_off[n]), n
    n_nf4 = 7 * 2  # 7 projections x 2 layers, every one NF4
    assert counts[False] == 2 * 3 * n_nf4 and counts[True] == 2 * 2 * n_nf4  # 2 micro-batches


@pytest.mark.parametrize("group", [True, False])
def test_recomputing_layers_dequantise_twice_and_kept_layers_too(tiny_llama, dequant_calls, group):  # noqa: ANN001
    """tiny-llama has two layers; with ``recompute_layers: 1`` layer 0 recomputes and layer 1 keeps its
    activations. Per NF4 weight and micro-batch: layer 0 dequantises 3 times without reuse (forward, recompute,
    backward), 2 with it; layer 1 twice (forward, backward) either way."""
    for reuse, want in ((False, [3, 2]), (True, [2, 2])):
        model = _model(tiny_llama, reuse, recompute_layers=1, group_projections=group)
        assert model.checkpointed_layers == frozenset({0})
        dequant_calls.clear()
        model(_ids(1), labels=_ids(1)).backward()
        assert _per_layer(model, dequant_calls) == [[want[0]] * 7, [want[1]] * 7], reuse


def test_the_switch_is_off_after_an_error_in_the_recompute(tiny_llama, dequant_calls, monkeypatch):  # noqa: ANN001
    """An exception inside a layer's recompute (where the switch is on) leaves it off: the next step's layers
    that keep their activations keep no dense weight (two dequantisations per weight, as without reuse)."""
    model = _model(tiny_llama, True, recompute_layers=1)
    down = model.model.layers[0].mlp.down_proj
    seen = []

    def failing(x: torch.Tensor) -> torch.Tensor:
        seen.append(reusing_dequantised())
        if seen[-1]:
            raise RuntimeError("failed inside the recompute")
        return type(down).forward(down, x)

    monkeypatch.setattr(down, "forward", failing)
    with pytest.raises(RuntimeError, match="failed inside the recompute"):
        model(_ids(1), labels=_ids(1)).backward()
    assert seen == [False, True]  # the no-grad forward, then the recompute
    assert not reusing_dequantised()
    monkeypatch.delattr(down, "forward")
    dequant_calls.clear()
    model(_ids(2), labels=_ids(2)).backward()
    assert _per_layer(model, dequant_calls) == [[2] * 7, [2] * 7]  # left on: layer 1 would dequantise once
