"""Planning a preference run to a memory budget: what DPO's, ORPO's and KTO's steps cost, and planned runs that
train as the unplanned ones do (a plan moves tensors and recomputes; the maths stays)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kernels.trainer import planner as planner_mod
from kernels.trainer.config import DecoderConfig, MethodOptions, ObjectiveOptions, TrainerConfig, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.plan import GIB, DeviceSpeed, Plan, choose, lean_plan, predict
from kernels.trainer.planner import Planner, plan_of
from kernels.trainer.preference import train_preference
from tests.kernels.test_kto import toy_rows
from tests.kernels.test_plan import _preset, llama_1b_bf16, synthetic  # noqa: F401 (a fixture)
from tests.kernels.test_preference_trainer import toy_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 2048


def _cfg(kind: str, reference: str = "adapter_disabled", micro_batch: int = 2, budget: float = 24.0,
         device: str = "cpu") -> TrainerConfig:
    return TrainerConfig(method=MethodOptions(kind="lora", lora_r=16, plan=budget),
                         train=TrainSettings(micro_batch=micro_batch, grad_accum=2, steps=3, lr=1e-2),
                         dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=torch.device(device),
                         objective=ObjectiveOptions(kind=kind, reference=reference))


def _costs(cfg: TrainerConfig):  # noqa: ANN202
    return planner_mod._costs(cfg, _preset("llama-3.1-8b"), SEQ, False, DeviceSpeed())


@pytest.mark.parametrize(("kind", "reference", "sequences", "nograd", "streams"), [
    ("sft", "adapter_disabled", 2, (), True),
    ("orpo", "adapter_disabled", 4, (), True),  # chosen and rejected, no reference
    ("dpo", "adapter_disabled", 4, (1.0,), False),  # the reference over both sequences of every pair
    ("dpo", "precomputed", 4, (), False),
    ("kto", "adapter_disabled", 2, (1.0, 2.0), False),  # KL under the policy; rows and KL under the reference
    ("kto", "precomputed", 2, (1.0,), False),
])
def test_each_objective_costs_its_sequences_and_its_forwards_without_gradient(kind, reference, sequences, nograd,
                                                                              streams):
    """At the 8B shapes, two rows a micro-batch: what trains with gradient (a pair is two sequences), which forwards
    run without it, and that only SFT and ORPO may stream layers (the trainer streams in checkpointed passes)."""
    m = _costs(_cfg(kind, reference, device="cuda"))
    assert m.hidden_bytes == sequences * SEQ * 4096 * 2 and m.nograd_forwards == nograd and m.can_stream == streams
    assert m.can_graph == (kind == "sft")  # pairs are packed rows, and the graphed step is SFT's
    base = replace(m, nograd_forwards=())
    plan = Plan()
    # each forward without gradient: every layer's forward and the LM head's logits at its tokens
    extra = m.grad_accum * sum(nograd) * (sum(c.forward_s for c in m.layers) + m.loss_s / 2)
    assert predict(m, plan).step_s - predict(base, plan).step_s == pytest.approx(extra, rel=1e-9)
    if nograd:
        assert extra > 0.1 * predict(base, plan).step_s


def test_a_forward_without_gradient_holds_little_and_binds_only_when_long():
    """Nothing of the forward is kept: at the 8B shapes the reference pass peaks far under the training step's own
    moments, so the plan's peak is SFT's over the same sequences; only a pass over many times the tokens of a step
    (a synthetic case) sets the peak, and then at its own activations."""
    dpo, orpo = _costs(_cfg("dpo", device="cuda")), _costs(_cfg("orpo", device="cuda"))
    for plan in (Plan(), lean_plan(dpo)):
        assert predict(dpo, plan).peak_bytes == predict(orpo, plan).peak_bytes
    m = synthetic()
    long = replace(m, nograd_forwards=(40.0,))
    per_layer = max(m.layers[0].keep_bytes, m.loss_bytes)
    static = predict(m, Plan()).static_bytes
    assert predict(long, Plan()).peak_bytes == static + m.trainable_state_bytes + 40 * per_layer
    # and an LM head on the host comes back for every such forward
    assert (predict(replace(m, nograd_forwards=(1.0,)), Plan(offload_lm_head=True)).step_s
            > predict(m, Plan(offload_lm_head=True)).step_s + sum(c.forward_s for c in m.layers) * m.grad_accum)


def test_the_planner_fits_a_tighter_budget_for_dpo_than_for_sft_no_tighter():
    """The budget a DPO run needs is that of SFT over the same sequences (its reference pass keeps nothing), and a
    precomputed reference makes the planned step faster, not leaner."""
    dpo, pre = _cfg("dpo", device="cuda"), _cfg("dpo", "precomputed", device="cuda")
    decoder = _preset("llama-3.1-8b")
    for budget in (12.0, 16.0, 24.0):
        a, b = replace(dpo, method=replace(dpo.method, plan=budget)), replace(pre, method=replace(pre.method,
                                                                                              plan=budget))
        assert Planner.predicts_fit(a, decoder, SEQ) == Planner.predicts_fit(b, decoder, SEQ)
    usable = 16 * 2**30
    ma, mb = _costs(dpo), _costs(pre)
    pa, pb = choose(ma, usable), choose(mb, usable)
    assert pa is not None and pa == pb and predict(mb, pb).step_s < predict(ma, pa).step_s


@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto"])
def test_a_planned_preference_run_trains_as_the_unplanned_one(tiny_llama_fp32, kind):  # noqa: ANN001
    """The tiny model planned to the smallest budget its lean plan fits (embeddings or LM head on the host, layers
    recomputing): the same losses and statistics as with every knob at its default, a probe recorded after step 2;
    a step that runs out of memory before the probe moves to a leaner plan and is done again."""
    rows = toy_rows(6, labels=(True, False)) if kind == "kto" else toy_pairs(4)
    o = ObjectiveOptions(kind=kind, beta=0.5)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=4, lr=1e-2)
    lora = dict(kind="lora", lora_r=4, lora_alpha=8)
    want = train_preference(load_model(tiny_llama_fp32, MethodOptions(**lora), dtype=torch.float32, device="cpu",
                                       seed=0), rows, s, o)
    decoder = DecoderConfig.from_checkpoint(tiny_llama_fp32)

    def planned(fails: int, usable) -> tuple[Planner, list[dict]]:  # noqa: ANN001
        cfg = TrainerConfig(method=MethodOptions(**lora), train=s, dtype=torch.float32, device=torch.device("cpu"),
                            objective=o)
        m = planner_mod._costs(cfg, decoder, 24, False, DeviceSpeed())
        planner = Planner(m, usable(m), {"setting": 1.0}, cfg.method)
        model = load_model(tiny_llama_fp32, cfg.method, dtype=torch.float32, device="cpu", seed=0)
        planner.attach(model)
        calls, real = [0], model.hidden_states

        def hidden_states(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] <= fails:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*a, **kw)

        model.hidden_states = hidden_states
        return planner, train_preference(model, rows, s, o, on_step_end=planner.after_step,
                                         on_oom=planner.after_oom)

    planner, got = planned(0, lambda m: predict(m, lean_plan(m)).peak_bytes)
    assert plan_of(planner.options) == planner.plan and planner.plan.offloads and planner.record["fits"]
    assert json.loads(json.dumps(planner.record))["probe"]["after_step"] == 2
    _same_steps(got, want)
    planner, got = planned(1, lambda m: predict(m, choose(m, 1e15)).peak_bytes)  # just fits the fastest plan
    moved = planner.record["replanned_after_oom"]
    assert moved["step"] == 1 and Plan(**moved["plan"]) != Plan(**moved["from_plan"])
    _same_steps(got, want)


def _same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6, nan_ok=True)  # fp32 sums of ~30 log-probs: relative


@pytest.mark.parametrize("knobs", [dict(recompute_layers=1, remake_mlp_layers=-1),
                                   dict(offload_checkpoints=True, offload_embeddings=True, offload_lm_head=True),
                                   dict(mlp_chunk_tokens=8)])
@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo"])
def test_every_knob_a_plan_sets_keeps_the_preference_steps(tiny_llama_fp32, kind, knobs):  # noqa: ANN001
    """What a plan may choose for a preference run (remade projections, host copies, a tiled MLP; ORPO's streamed
    layers) changes where tensors live and what is recomputed, in the forwards with and without gradient alike: the
    same steps."""
    if kind == "orpo" and "offload_checkpoints" in knobs:
        knobs = knobs | {"offload_weights": 1}
    rows = toy_rows(6, labels=(True, False)) if kind == "kto" else toy_pairs(4)
    o = ObjectiveOptions(kind=kind, beta=0.5)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=3, lr=1e-2)
    runs = [train_preference(load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4, lora_alpha=8, **k),
                                        dtype=torch.float32, device="cpu", seed=0), rows, s, o) for k in ({}, knobs)]
    _same_steps(runs[1], runs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_planned_preference_run_stays_under_its_cap_on_gpu(llama_1b_bf16, kind):  # noqa: ANN001, F811
    """Llama-3.2-1B shapes (bf16 LoRA; DPO 2 pairs, KTO 4 rows, of 1,024-token sequences) under a per-process cap of
    5 GiB: the planned run trains, its reference and KL passes included, and torch's reserved peak stays under the
    cap. Prints the plan record (predicted vs measured)."""
    import random

    dev = torch.device("cuda", torch.cuda.current_device())
    budget = 5.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.set_per_process_memory_fraction(budget * GIB / torch.cuda.get_device_properties(dev).total_memory, dev)
    try:
        rng = random.Random(0)
        ids = lambda k: [rng.randrange(3, 128000) for _ in range(k)]  # noqa: E731
        rows = ([{"prompt_ids": ids(512), "completion_ids": ids(512), "label": i % 2 == 0} for i in range(16)]
                if kind == "kto" else
                [{"prompt_ids": ids(512), "chosen_ids": ids(512), "rejected_ids": ids(512)} for _ in range(8)])
        s = TrainSettings(micro_batch=4 if kind == "kto" else 2, grad_accum=1, steps=4, lr=1e-4,
                          optimizer="adamw_torch_fused")
        cfg = TrainerConfig(method=MethodOptions(kind="lora", plan=budget), train=s, dtype=torch.bfloat16, device=dev,
                            objective=ObjectiveOptions(kind=kind))
        planner = Planner.start(cfg, DecoderConfig.from_checkpoint(llama_1b_bf16), seq_len=1024)
        model = load_model(llama_1b_bf16, cfg.method, dtype=torch.bfloat16, device=dev, seed=0)
        planner.attach(model)
        history = train_preference(model, rows, s, cfg.objective, device=dev, on_step_end=planner.after_step,
                                   on_oom=planner.after_oom)
        peak = torch.cuda.max_memory_reserved(dev)
        print(json.dumps({"kind": kind, "peak_reserved_gib": peak / GIB,
                          "peak_alloc_gib": torch.cuda.max_memory_allocated(dev) / GIB,
                          "losses": [h["loss"] for h in history], "record": planner.record}))
        assert planner.record["fits"] and planner.record["probe"]["after_step"] == 2
        assert all(0 < h["loss"] < 5 for h in history) and all(h["reference_forwards"] > 0 for h in history)
        assert peak <= budget * GIB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
