"""The trainer's planner: cost model, plan choice under a budget, re-planning, and a planned run (CPU; one GPU test)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import yaml

from kernels.trainer import plan as plan_mod
from kernels.trainer import planner as planner_mod
from kernels.trainer.batches import IGNORE_INDEX
from kernels.trainer.config import DecoderConfig, MethodOptions, TrainerConfig, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.plan import (
    GIB,
    CostModel,
    DeviceSpeed,
    LayerCost,
    Plan,
    candidates,
    choose,
    costs_for,
    lean_plan,
    predict,
)
from kernels.trainer.planner import Planner, apply_plan, plan_of, reconfigure, usable_bytes
from kernels.trainer.train import train
from tests.worker_run import run_first_row

MIB = 2**20
PAD, BOS, EOS = 0, 1, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n: int = 8, h2d_gbps: float = 20.0, graph: bool = True, grad_accum: int = 2) -> CostModel:
    """A made-up model: 8 layers of 100 MiB weights keeping 50 MiB of activations, 10 ms forward, 12 ms backward;
    a 200 MiB embedding and head; a slow-ish link (20 GB/s), so streaming costs time."""
    layer = LayerCost(weight_bytes=100 * MIB, keep_bytes=50 * MIB, checkpoint_bytes=4 * MIB,
                      transient_bytes=100 * MIB, forward_s=0.010, backward_s=0.012)
    return CostModel(layers=(layer,) * n, grad_accum=grad_accum, fixed_bytes=10 * MIB,
                     trainable_state_bytes=30 * MIB, embed_bytes=200 * MIB, head_bytes=200 * MIB,
                     loss_bytes=60 * MIB, hidden_bytes=4 * MIB, loss_s=0.008, optimizer_s=0.001,
                     speed=DeviceSpeed(h2d_gbps=h2d_gbps, d2h_gbps=h2d_gbps), can_graph=graph)


def _peaks(m: CostModel) -> list[int]:
    return sorted({predict(m, p).peak_bytes for p in candidates(m)})


# -- the choice ---------------------------------------------------------------------------------------------------


def test_a_bigger_budget_never_gives_a_slower_plan_and_no_plan_is_over_budget():
    m = synthetic()
    lo, hi = predict(m, lean_plan(m)).peak_bytes, max(_peaks(m))
    budgets = [lo + (hi - lo) * k // 40 for k in range(41)] + [hi * 2]
    steps = []
    for b in budgets:
        p = choose(m, b)
        assert p is not None
        pr = predict(m, p)
        assert pr.peak_bytes <= b
        steps.append(pr.step_s)
    assert steps == sorted(steps, reverse=True)
    assert steps[0] > steps[-1]  # the budget matters: the lean end is slower


def test_a_tight_budget_gives_the_lean_plan():
    m = synthetic()
    lean = lean_plan(m)
    # everything on the host and every layer recomputing is the smallest this model gets
    assert lean == Plan(recompute_layers=-1, offload_weights=8, offload_checkpoints=True, offload_embeddings=True,
                        offload_lm_head=True)
    assert choose(m, predict(m, lean).peak_bytes) == lean


def test_nothing_fits_gives_none_and_the_planner_runs_the_lean_plan_marked():
    m = synthetic()
    too_small = predict(m, lean_plan(m)).peak_bytes - 1
    assert choose(m, too_small) is None
    options = MethodOptions(kind="lora")
    planner = Planner(m, too_small, {"setting": "test"}, options)
    assert planner.plan == lean_plan(m) and planner.record["fits"] is False
    assert (options.offload_weights, options.offload_embeddings, options.recompute_layers) == (8, True, -1)


def test_a_roomy_budget_gives_the_fastest_plan():
    m = synthetic()
    p = choose(m, 100 * GIB)
    assert p == Plan(recompute_layers=1, cuda_graph=True)  # keep 7 of 8 layers' activations, graphed, no offload
    assert not synthetic(graph=False).can_graph and choose(synthetic(graph=False), 100 * GIB).cuda_graph is False
    assert choose(m, 100 * GIB, cuda_graph=False) == Plan(recompute_layers=1)


def test_predicted_costs_of_each_knob():
    m = synthetic()
    base = predict(m, Plan())
    keep1 = predict(m, Plan(recompute_layers=7))
    # one layer (the last) keeps its activations, minus its recompute forward per micro-batch. Its backward runs
    # first and frees them, so no recompute runs beside them: the peak moves to the forward's end (7 checkpoints,
    # its activations and the loss) from the first backward (8 checkpoints and a recompute + backward)
    assert keep1.peak_bytes - base.peak_bytes == (7 * 4 + 50 + 60) * MIB - (8 * 4 + 100) * MIB
    assert base.step_s - keep1.step_s == pytest.approx(2 * 0.010)
    # checkpoints on the host: only two on the device; fetched back on the compute stream in backward
    ck = predict(m, Plan(offload_checkpoints=True))
    assert base.peak_bytes - ck.peak_bytes == 8 * 4 * MIB - 2 * 4 * MIB
    assert ck.step_s - base.step_s == pytest.approx(2 * 8 * 4 * MIB / 20e9)
    # a streamed layer leaves the device's static bytes; a fast link hides its copy behind the layers before it
    s2 = predict(m, Plan(offload_weights=2))
    assert base.static_bytes - s2.static_bytes == 2 * 100 * MIB
    fast = synthetic(h2d_gbps=1000.0)
    assert predict(fast, Plan(offload_weights=2)).step_s == pytest.approx(predict(fast, Plan()).step_s, rel=1e-3)
    assert s2.step_s > base.step_s
    # the LM head on the host: its device copy is there at the forward's end instead of all the time
    head = predict(m, Plan(offload_lm_head=True))
    assert head.static_bytes == base.static_bytes - 200 * MIB and head.peak_bytes <= base.peak_bytes
    graph = predict(m, Plan(recompute_layers=1, cuda_graph=True))
    assert graph.peak_bytes - predict(m, Plan(recompute_layers=1)).peak_bytes == plan_mod.GRAPH_EXTRA_BYTES
    # the graph saves host launches per layer and micro-batch: 7 kept and 1 recomputing here
    kept_s, recomputed_s = m.graph_saving_s
    assert predict(m, Plan(recompute_layers=1)).step_s - graph.step_s == pytest.approx(2 * (7 * kept_s + recomputed_s))


def test_candidates_respect_the_trainers_rules():
    m = synthetic()
    plans = list(candidates(m))
    # a graph takes no host copy inside the step; an offloaded input embedding is gathered before the replay
    graphed = [p for p in plans if p.cuda_graph]
    assert graphed and not any(p.offload_weights or p.offload_checkpoints or p.offload_lm_head for p in graphed)
    assert any(p.offload_embeddings for p in graphed)
    assert {p.offload_embeddings for p in candidates(m, cuda_graph=True, embeddings=True)} == {True}
    assert all(p.offload_weights <= (8 if p.recompute_layers == -1 else p.recompute_layers) for p in plans)
    assert len(plans) == len(set(plans))
    no_ckpt = CostModel(**{**vars(m), "checkpointing": False})
    assert {(p.recompute_layers, p.offload_weights, p.offload_checkpoints) for p in candidates(no_ckpt)} == {(-1, 0,
                                                                                                             False)}


def test_measured_corrections_make_the_planner_replan(monkeypatch):
    """A probe peak above the prediction: the activation factor is solved from it, and the plan moves to one that
    fits the corrected model (and is applied to the live model)."""
    m = synthetic()
    options = MethodOptions(kind="lora")
    budget = predict(m, Plan(recompute_layers=3)).peak_bytes
    planner = Planner(m, budget, {"setting": "test"}, options)
    first = planner.plan
    assert predict(m, first).peak_bytes <= budget
    moved = []
    monkeypatch.setattr(planner_mod, "reconfigure", lambda model, o: moved.append(plan_of(o)))
    planner.model = SimpleNamespace(device_of_compute=torch.device("cuda"))
    planner._static = planner.prediction.static_bytes
    measured = planner.prediction.peak_bytes + 300 * MIB  # activations 300 MiB above the model's count
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: measured)
    assert planner.after_step(1) is False
    assert planner.after_step(2) is True
    probe = planner.record["probe"]
    assert probe["act_factor"] > 1.0 and probe["measured_peak_alloc_gib"] == round(measured / GIB, 3)
    corrected = m.corrected(act_factor=probe["act_factor"], time_factor=probe["time_factor"])
    assert predict(corrected, first).peak_bytes == pytest.approx(measured, rel=1e-3)  # the factor as recorded
    assert moved == [planner.plan] and planner.plan != first
    assert predict(corrected, planner.plan).peak_bytes <= budget
    assert planner.record["replanned"]["why"] == "peak above the prediction"
    assert planner.record["replanned"]["from_plan"] == first.knobs() != planner.record["plan"]
    assert planner.record["plan"] == planner.plan.knobs() == plan_of(options).knobs()
    assert planner.after_step(3) is False  # once


@pytest.mark.parametrize("slack_mib", [100, 500])
def test_the_probe_holds_back_the_allocator_slack_it_measured(monkeypatch, slack_mib):
    """The budget's margin holds ``slack_allowance_gib`` for the caching allocator's slack (reserved over
    allocated). A probe exactly as predicted, with slack under the allowance: no re-plan. With slack over it, the
    plan's peak is over what the budget leaves: the planner moves to a plan within that room. (The 8B QLoRA row
    under 12 GiB on the H200 measured 1.74 GiB of slack against 0.48 GiB held back.)"""
    m = synthetic()
    options = MethodOptions(kind="lora")
    usable = predict(m, Plan(recompute_layers=3)).peak_bytes
    planner = Planner(m, usable, {"setting": "test", "slack_allowance_gib": 200 * MIB / GIB}, options)
    first = planner.plan
    moved = []
    monkeypatch.setattr(planner_mod, "reconfigure", lambda model, o: moved.append(plan_of(o)))
    planner.model = SimpleNamespace(device_of_compute=torch.device("cuda"))
    planner._static = planner.prediction.static_bytes
    peak = planner.prediction.peak_bytes
    assert usable - 200 * MIB < peak <= usable  # the chosen plan uses the budget's room
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev=None: peak + slack_mib * MIB)
    replanned = planner.after_step(2, planner.prediction.step_s)
    probe = planner.record["probe"]
    assert probe["measured_slack_gib"] == round(slack_mib * MIB / GIB, 3)
    room = usable + 200 * MIB - slack_mib * MIB
    assert probe["room_after_probe_gib"] == round(room / GIB, 3)
    assert probe["act_factor"] == pytest.approx(1.0, abs=2e-3)
    if slack_mib < 200:
        assert replanned is False and planner.plan == first and not moved
        return
    assert replanned is True and moved == [planner.plan] != [first]
    assert planner.record["replanned"]["why"] == "slack above the margin"
    assert predict(m, planner.plan).peak_bytes <= room < peak


def test_a_graphed_plans_probe_is_read_as_the_eager_step_it_measured(monkeypatch):
    """A graphed plan's probe step is one of the step graph's eager warm-up steps: a run exactly as predicted for
    the plan without its graph (slower by the graph's saving, without the graph pool) gets no correction and no
    re-plan; read against the graphed prediction it would have looked slower (a time factor above 1). Its first
    step that only replays is the graph's measured saving."""
    m = synthetic()
    options = MethodOptions(kind="lora")
    planner = Planner(m, predict(m, Plan(recompute_layers=-1)).peak_bytes * 3, {"setting": "test"}, options)
    graphed = planner.plan
    assert graphed.cuda_graph
    eager = predict(m, replace(graphed, cuda_graph=False))
    assert eager.step_s > planner.prediction.step_s and eager.peak_bytes < planner.prediction.peak_bytes
    monkeypatch.setattr(planner_mod, "reconfigure", lambda model, o: pytest.fail("re-planned"))
    planner.model = SimpleNamespace(device_of_compute=torch.device("cuda"))
    planner._static = planner.prediction.static_bytes
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: eager.peak_bytes)
    assert planner.after_step(2, eager.step_s) is False
    probe = planner.record["probe"]
    assert probe["measured_eagerly"] is True
    assert probe["time_factor"] == pytest.approx(1.0, abs=2e-3) and probe["act_factor"] == pytest.approx(1.0, abs=2e-3)
    assert planner.plan == graphed and planner.record["replanned"] is None
    # the first step that only replays (step 3 captures) against the eager probe: the graph's saving, measured
    planner.after_step(3, 9.0)
    assert planner.record["graph"] is None
    planner.after_step(4, eager.step_s - 0.004)
    assert planner.record["graph"] == {"after_step": 4, "measured_step_s": round(eager.step_s - 0.004, 4),
                                       "measured_saving_s": 0.004,
                                       "predicted_saving_s": round(eager.step_s - planner.prediction.step_s, 4)}


# -- the analytic model on real shapes ----------------------------------------------------------------------------


def _preset(name: str) -> DecoderConfig:
    return DecoderConfig.from_dict(yaml.safe_load(open(f"scenarios/presets/{name}.yaml"))["config"])


def test_costs_at_the_8b_shapes_match_the_readme_table():
    cfg = _preset("llama-3.1-8b")
    # the H100 measurements below were made keeping every activation (before remake_activations)
    m = costs_for(cfg, MethodOptions(kind="lora", remake_activations=False), 2, 1, 2048, torch.bfloat16,
                  torch.device("cuda"))
    layer = m.layers[0]
    assert layer.weight_bytes / GIB == pytest.approx(0.406, abs=1e-3)  # 218.1 M x 2 B
    assert layer.keep_bytes / 1e6 == pytest.approx(570, rel=0.01)  # kernels/trainer/README.md: ~570 MB
    # remade: both norm outputs (2 x 4096 wide) and the SwiGLU output (14,336 wide) per token, bf16, 4096 tokens
    remade = costs_for(cfg, MethodOptions(kind="lora"), 2, 1, 2048, torch.bfloat16, torch.device("cuda"))
    assert layer.keep_bytes - remade.layers[0].keep_bytes == 4096 * 2 * (2 * 4096 + 14336)
    assert m.embed_bytes / GIB == pytest.approx(0.98, abs=0.01) and m.head_bytes == m.embed_bytes
    # the plain row (every layer recomputes, nothing offloaded): measured 17.28 GiB allocated on the H100
    assert predict(m, Plan()).peak_bytes / GIB == pytest.approx(17.3, abs=0.6)
    q = costs_for(cfg, MethodOptions(kind="qlora", remake_activations=False), 2, 1, 2048, torch.bfloat16,
                  torch.device("cuda"))
    assert not q.can_stream and q.layers[0].weight_bytes / layer.weight_bytes == pytest.approx(0.258, abs=0.002)


def test_reusing_the_recomputes_dequantised_weights_costs_their_bytes_and_saves_a_dequantisation():
    """QLoRA ``reuse_dequant`` at the 8B shapes: a recomputing layer holds all 7 projections' bf16 weights as its
    backward starts (218.1 M x 2 B = 436 MB on top of its transient) and skips one blocked-kernel pass over them
    (NF4 read + bf16 written, 2.516 B per weight, at 85 % of the 3.0 TB/s HBM rate: 0.215 ms) per micro-batch."""
    cfg, dev = _preset("llama-3.1-8b"), torch.device("cuda")
    on, off = (costs_for(cfg, MethodOptions(kind="qlora", reuse_dequant=r), 2, 1, 2048, torch.bfloat16, dev)
               for r in (True, False))
    n_proj = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336
    layer = on.layers[0]
    assert layer.reuse_bytes == 2 * n_proj == 436_207_616 and off.layers[0].reuse_bytes == 0
    per_weight = 0.5 + (1 + 4 / 256) / 64 + 2
    assert layer.reuse_saving_s == pytest.approx(n_proj * per_weight / (0.85 * 3000e9)) == pytest.approx(0.215e-3,
                                                                                                       rel=0.01)
    everything = Plan()  # all 32 layers recompute: each saves, the peak holds one layer's weights
    assert predict(on, everything).peak_bytes - predict(off, everything).peak_bytes == layer.reuse_bytes
    assert (predict(off, everything).step_s - predict(on, everything).step_s
            == pytest.approx(32 * layer.reuse_saving_s))
    one = Plan(recompute_layers=1, cuda_graph=True)  # one layer recomputes: one layer's saving
    assert predict(off, one).step_s - predict(on, one).step_s == pytest.approx(layer.reuse_saving_s)
    # the correction on activation bytes leaves the weights alone
    a = 1.5
    assert (predict(on.corrected(act_factor=a), everything).peak_bytes
            - predict(off.corrected(act_factor=a), everything).peak_bytes) == layer.reuse_bytes
    # nothing recomputes, nothing is NF4, or a tiled MLP (its projections keep nothing): no reuse, or attention's only
    no_ckpt = costs_for(cfg, MethodOptions(kind="qlora", gradient_checkpointing=False), 2, 1, 2048, torch.bfloat16, dev)
    lora = costs_for(cfg, MethodOptions(kind="lora"), 2, 1, 2048, torch.bfloat16, dev)
    assert no_ckpt.layers[0].reuse_bytes == lora.layers[0].reuse_bytes == 0
    tiled = costs_for(cfg, MethodOptions(kind="qlora", mlp_chunk_tokens=1024), 2, 1, 2048, torch.bfloat16, dev)
    assert tiled.layers[0].reuse_bytes == 2 * 4096 * (4096 + 1024 + 1024 + 4096)


def test_rows_longer_than_a_chunk_may_tile_the_mlp_where_nothing_else_fits():
    """8B QLoRA, one row: at 2,048 tokens no plan tiles the MLP; at 16,384 under 8 GiB (6.93 GiB usable) only a
    plan with the MLP over 8,192-token chunks is predicted to fit, and the planner takes it; with room, the
    untiled plan (one MLP forward less) wins. A tiled plan is never graphed."""
    cfg, dev = _preset("llama-3.1-8b"), torch.device("cuda")
    short = costs_for(cfg, MethodOptions(kind="qlora"), 1, 1, 2048, torch.bfloat16, dev)
    assert not short.tiled_layers and all(p.mlp_chunk_tokens is None for p in candidates(short))
    long = costs_for(cfg, MethodOptions(kind="qlora"), 1, 1, 16384, torch.bfloat16, dev)
    tiled, dense = long.tiled_layers[0], long.layers[0]
    assert tiled.keep_bytes < dense.keep_bytes and tiled.backward_s > dense.backward_s
    assert not any(p.cuda_graph for p in candidates(long) if p.mlp_chunk_tokens)
    usable = usable_bytes(8.0, torch.device("cpu"))[0]
    assert choose(replace(long, tiled_layers=()), usable) is None
    plan = choose(long, usable)
    assert plan is not None and plan.mlp_chunk_tokens == plan_mod.MLP_CHUNK_TOKENS
    assert predict(long, plan).peak_bytes <= usable < predict(long, replace(plan, mlp_chunk_tokens=None)).peak_bytes
    assert choose(long, 40 * GIB).mlp_chunk_tokens is None
    # a method that tiles already (mlp_chunk_tokens set by hand, as profile_step's knobs do): its layers are the tiled
    # ones, and the plan that names its chunk is predicted from them
    fixed = costs_for(cfg, MethodOptions(kind="qlora", mlp_chunk_tokens=plan_mod.MLP_CHUNK_TOKENS), 1, 1, 16384,
                      torch.bfloat16, dev)
    assert not fixed.tiled_layers and fixed.layers[0] == tiled
    assert predict(fixed, plan).peak_bytes == predict(long, plan).peak_bytes


def test_a_tiled_layers_backward_peaks_in_flash_attention_on_long_rows():
    """A recomputing layer whose MLP is tiled keeps little; its backward peaks either in the MLP (what it keeps, one
    chunk's gradients, the gradients of the layer's output and of the MLP's input) or, on long rows, in flash
    attention after the chunks are gone: what it keeps less the chunk, plus the layer's and the attention output's
    gradients, dq / dk / dv, the fp32 dq accumulator and (GQA) dk / dv expanded to every query head, 60 KB a token
    at the 8B shapes. Checked against the H100 (code 3247a5d), 8B LoRA, every layer recomputing and streamed,
    checkpoints on the host, chunks of 8,192 tokens: profile_step's tiled plan (results/plan_check-h100-20261206,
    head on the host) and the frontier's planned probes (results/llama8b_lora_frontier-frontier-20261206-040358,
    embeddings and head on the GPU). Twice the kept bytes, the rule of untiled layers, predicted 0.4 GiB too much at
    30,720 tokens and 1.0-1.3 GiB too little from 95,232."""
    cfg, dev = _preset("llama-3.1-8b"), torch.device("cuda")
    plan = Plan(recompute_layers=-1, offload_weights=32, offload_checkpoints=True, mlp_chunk_tokens=8192)
    attn_per_token = 2 * (4096 + 2 * 4096 + 2 * 1024 + 2 * 4096) + 4 * 4096
    chunk = 8192 * 2 * 3 * 14336
    for tokens, head_on_host, measured in ((30720, True, 5.90), (60416, False, 9.99), (95232, False, 13.76),
                                           (106496, False, 14.98)):  # GiB allocated at peak, measured
        m = costs_for(cfg, MethodOptions(kind="lora"), 1, 1, tokens, torch.bfloat16, dev)
        tiled = m.tiled_layers[0]
        in_attention = tiled.keep_bytes - chunk + tokens * attn_per_token
        in_mlp = tiled.keep_bytes + chunk + 2 * tokens * 4096 * 2
        assert tiled.transient_bytes == max(in_attention, in_mlp)
        assert (in_attention > in_mlp) == (tokens > 31000)
        assert measured - 0.25 < predict(m, replace(plan, offload_lm_head=head_on_host)).peak_bytes / GIB <= measured
        assert m.layers[0].transient_bytes == 2 * m.layers[0].keep_bytes  # untiled: the MLP's backward decides


def test_which_knobs_a_model_allows():
    tied = costs_for(_preset("llama-3.2-1b"), MethodOptions(kind="lora"), 1, 1, 512, torch.bfloat16,
                     torch.device("cuda"))
    assert not (tied.can_offload_embeddings or tied.can_offload_head) and tied.head_bytes == 0
    full = costs_for(_preset("tiny-llama"), MethodOptions(kind="full"), 1, 1, 64, torch.float32, torch.device("cpu"))
    assert not (full.can_stream or full.can_offload_embeddings or full.can_graph)
    assert all(not p.offloads or p.offload_checkpoints and not (p.offload_weights or p.offload_embeddings)
               for p in candidates(full))
    dropout = costs_for(_preset("tiny-llama"), MethodOptions(kind="lora", lora_dropout=0.1), 1, 1, 64,
                        torch.float32, torch.device("cuda"))
    assert not dropout.can_graph


def test_budget_setting():
    usable, rec = usable_bytes(4.0, torch.device("cpu"))
    assert usable == int(4 * GIB * (1 - planner_mod.MARGIN_FRACTION) - planner_mod.MARGIN_GIB * GIB)
    assert rec["usable_gib"] == round(usable / GIB, 3)
    assert rec["slack_allowance_gib"] == round(4 * planner_mod.MARGIN_FRACTION, 3)  # the margin's slack part
    with pytest.raises(ValueError, match="needs a CUDA device"):
        usable_bytes("auto", torch.device("cpu"))


# -- a planned run on the CPU -------------------------------------------------------------------------------------


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [BOS] + [rng.randrange(97, 123) for _ in range(rng.randint(8, 30))] + [EOS]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return rows


def _settings(steps: int) -> TrainSettings:
    return TrainSettings(micro_batch=2, grad_accum=2, steps=steps, lr=1e-3, pad_id=PAD)


def test_replanning_mid_run_keeps_the_losses(tiny_llama_fp32):  # noqa: ANN001
    """Moving a live model between plans (streaming, host embeddings and head, checkpoints, recomputation, remade
    MLP projections) changes where tensors live and what is recomputed, not the maths: the same losses as a run that
    never moved."""
    s = _settings(6)
    fixed = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=8), dtype=torch.float32, device="cpu",
                       seed=0)
    want = train(fixed, _rows(24), s, device=torch.device("cpu"))
    options = MethodOptions(kind="lora", lora_r=8)
    model = load_model(tiny_llama_fp32, options, dtype=torch.float32, device="cpu", seed=0)
    plans = {2: Plan(-1, 2, True, True, True, mlp_chunk_tokens=8), 4: Plan(recompute_layers=1, remake_mlp_layers=-1)}
    layouts = []

    def move(step: int) -> None:
        if step in plans:
            apply_plan(options, plans[step])
            reconfigure(model, options)
            layouts.append((model.streamer.layer_ids if model.streamer else [], model.checkpointed_layers,
                            model.offload_checkpoints, {layer.mlp_chunk_tokens for layer in model.model.layers},
                            [i for i, layer in enumerate(model.model.layers) if layer.remake_mlp]))

    got = train(model, _rows(24), s, device=torch.device("cpu"), on_step_end=move)
    assert got == pytest.approx(want, abs=1e-6)
    assert layouts == [([0, 1], None, True, {8}, []), ([], frozenset({0}), False, {None}, [1])]
    assert all(mod.weight is not None and mod.stream_weight is None for _, mod in model.linears())


def test_a_planned_lean_run_trains_and_records_its_plan(tiny_llama_fp32):  # noqa: ANN001
    """The planner's choice reaches the loaded model and the record: at the smallest budget it fits, the lean
    plan (for a 2-layer model: embeddings and head on the host, and the last layer keeping its activations, less
    gate and up, which it remakes: its backward runs first and frees them, so they never sit beside the other
    layer's recompute, and a recompute of its own would only add its checkpoint)."""
    cfg = TrainerConfig(method=MethodOptions(kind="lora", lora_r=8, plan=1.0), train=_settings(3), dtype=torch.float32,
                        device=torch.device("cpu"))
    decoder = DecoderConfig.from_checkpoint(tiny_llama_fp32)
    m = costs_for(decoder, cfg.method, 2, 2, 32, torch.float32, cfg.device)
    planner = Planner(m, predict(m, lean_plan(m)).peak_bytes, {"setting": 1.0}, cfg.method)
    assert planner.record["fits"] and planner.plan == lean_plan(m)
    model = load_model(tiny_llama_fp32, cfg.method, dtype=torch.float32, device="cpu", seed=0)
    planner.attach(model)
    losses = train(model, _rows(12), cfg.train, device=cfg.device, on_step_end=planner.after_step)
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert plan_of(model.options) == lean_plan(m) == Plan(recompute_layers=1, offload_embeddings=True,
                                                          offload_lm_head=True, remake_mlp_layers=-1)
    rec = json.loads(json.dumps(planner.record))  # JSON-able, as the run stores it
    assert rec["plan"] == lean_plan(m).knobs() and rec["probe"]["after_step"] == 2
    assert rec["probe"]["measured_step_s"] > 0 and "measured_peak_alloc_gib" not in rec["probe"]  # no CUDA stats


def test_a_step_out_of_memory_before_the_probe_moves_to_a_leaner_plan_and_is_done_again(tiny_llama_fp32):  # noqa: ANN001
    """The model under-predicted: the first step runs out of memory under the planned plan. The planner takes the
    plan's peak as over the budget, moves the live model to a leaner plan, and the step is done again: the same
    losses as a run that never ran out. Once only; with nothing leaner to go to, the error stands."""
    s = _settings(3)
    want = train(load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=8), dtype=torch.float32,
                            device="cpu", seed=0), _rows(12), s, device=torch.device("cpu"))
    decoder = DecoderConfig.from_checkpoint(tiny_llama_fp32)

    def planned_run(usable_of, failures: int) -> tuple[Planner, list[float]]:  # noqa: ANN001
        options = MethodOptions(kind="lora", lora_r=8)
        m = costs_for(decoder, options, 2, 2, 32, torch.float32, torch.device("cpu"))
        planner = Planner(m, usable_of(m), {"setting": 1.0}, options)
        model = load_model(tiny_llama_fp32, options, dtype=torch.float32, device="cpu", seed=0)
        planner.attach(model)
        calls = [0]
        real = model.forward

        def forward(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] <= failures:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*a, **kw)

        model.forward = forward
        return planner, train(model, _rows(12), s, device=torch.device("cpu"), on_step_end=planner.after_step,
                              on_oom=planner.after_oom)

    fastest = lambda m: predict(m, choose(m, 1e15)).peak_bytes  # noqa: E731 (a budget that the fastest plan just fits)
    planner, got = planned_run(fastest, failures=1)
    assert got == want
    rec = json.loads(json.dumps(planner.record))["replanned_after_oom"]
    first, now = Plan(**rec["from_plan"]), Plan(**rec["plan"])
    assert rec["step"] == 1 and rec["act_factor"] >= 1.0 and now == planner.plan == plan_of(planner.options) != first
    assert predict(planner.costs, now).peak_bytes < predict(planner.costs, first).peak_bytes
    assert planner.record["plan"] == now.knobs()
    with pytest.raises(torch.OutOfMemoryError, match="no leaner plan"):
        planned_run(fastest, failures=2)  # a second time in the same step: once only
    with pytest.raises(torch.OutOfMemoryError, match="no leaner plan"):
        planned_run(lambda m: predict(m, lean_plan(m)).peak_bytes, failures=1)  # already the leanest


def test_the_adapter_plans_and_records(tmp_path, monkeypatch):  # noqa: ANN001
    """Through the harness worker: the `plan` override reaches the trainer, the run is valid and stores its plan."""
    from harness.spec.scenario import parse_scenario

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    sc = parse_scenario("""
version: 1
name: tb_plan_test
model: {preset: tiny-llama, weights: random, dtype: float32, seed: 0}
method: {kind: lora, lora_r: 4, lora_alpha: 8, target_modules: all-linear}
data: {source: synthetic, seq_len: 48, lengths: uniform, min_len: 12}
train: {micro_batch: 2, grad_accum: 1, steps: 3, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}
hardware: {device: cpu}
frameworks: [{name: tunebench, label: tunebench-planned, overrides: {plan: 2}}]
""")
    res = run_first_row(sc, tmp_path)
    trainer = res["extra"]["trainer"]
    plan = trainer["plan"]
    assert plan["budget"]["setting"] == 2.0 and plan["fits"] and plan["probe"]["after_step"] == 2
    assert {"predicted_peak_alloc_gib", "predicted_step_s"} <= set(plan)
    # 2 GiB is roomy for a tiny model: the fastest plan, one layer recomputing, nothing on the host (no graph: CPU)
    assert plan["plan"] == Plan(recompute_layers=1).knobs()
    assert trainer["recomputed_layers"] == [0] and trainer["streamed_layers"] == []


def test_plan_budget_follows_the_scenario():
    from adapters_for_tools.tunebench.adapter import plan_budget

    assert plan_budget("auto", None) == "auto" and plan_budget("auto", 24.0) == 24.0
    assert plan_budget(30.0, 24.0) == 24.0 and plan_budget(12.0, 24.0) == 12.0 and plan_budget(None, 24.0) is None


@pytest.fixture(scope="module")
def llama_1b_bf16(tmp_path_factory):  # noqa: ANN001, ANN201
    """A random Llama-3.2-1B-shaped bf16 checkpoint (built on the GPU, once per module)."""
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(tmp_path_factory.mktemp("llama_1b_cache")))
        yield prepare_random_checkpoint(get_preset("llama-3.2-1b"), "bfloat16", 0, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("budget_gib", [4.0, 8.0])
def test_planned_run_stays_under_its_cap_on_gpu(llama_1b_bf16, budget_gib):  # noqa: ANN001
    """Llama-3.2-1B shapes (bf16 LoRA, 2 x 2048 tokens) under a per-process cap of ``budget_gib``: the planned run
    trains and torch's reserved peak stays under the cap. Prints the plan record (predicted vs measured)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / total, dev)
    try:
        s = TrainSettings(micro_batch=2, grad_accum=1, steps=6, lr=1e-4, optimizer="adamw_torch_fused", pad_id=PAD)
        cfg = TrainerConfig(method=MethodOptions(kind="lora", plan=budget_gib), train=s, dtype=torch.bfloat16,
                            device=dev)
        planner = Planner.start(cfg, DecoderConfig.from_checkpoint(llama_1b_bf16), seq_len=2048)
        model = load_model(llama_1b_bf16, cfg.method, dtype=torch.bfloat16, device=dev, seed=0)
        planner.attach(model)
        rng = random.Random(0)
        rows = [{"input_ids": (ids := [rng.randrange(3, 128000) for _ in range(2048)]), "labels": ids}
                for _ in range(12)]
        losses = train(model, rows, s, device=dev, on_step_end=planner.after_step)
        peak = torch.cuda.max_memory_reserved(dev)
        print(json.dumps({"budget_gib": budget_gib, "peak_reserved_gib": peak / GIB,
                          "peak_alloc_gib": torch.cuda.max_memory_allocated(dev) / GIB, "losses": losses,
                          "record": planner.record}))
        assert planner.record["fits"] and planner.record["probe"]["after_step"] == 2
        assert all(0 < x < 20 for x in losses)
        assert peak <= budget_gib * GIB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def test_remaking_gate_and_up_frees_their_bytes_for_one_projection_and_wins_between_budgets():
    """remake_mlp_layers at the 8B QLoRA shapes (micro-batch 2 x 2048): a kept layer that remakes its gate and up
    keeps 2 x 14,336 bf16 widths per token less (235 MB) for one gate / up projection (base + LoRA) in its backward;
    between the budgets where all layers keep and where most recompute, the planner takes it, predicted faster than
    every plan without it that fits."""
    cfg, dev = _preset("llama-3.1-8b"), torch.device("cuda")
    m = costs_for(cfg, MethodOptions(kind="qlora"), 2, 1, 2048, torch.bfloat16, dev)
    layer = m.layers[0]
    assert layer.mlp_remake_bytes == 4096 * 2 * 14336 * 2
    rate = 700e12 * plan_mod.STEP_EFFICIENCY
    assert layer.mlp_remake_s == pytest.approx(1.12 * 2 * 4096 * (2 * 4096 * 14336 + 16 * 2 * (4096 + 14336)) / rate)
    assert layer.mlp_remake_s < layer.forward_s * 0.6  # about half of the forward a recomputing layer runs again
    one, remade = Plan(recompute_layers=1), Plan(recompute_layers=1, remake_mlp_layers=-1)
    # the forward's end holds all 31 kept layers' activations, the first backward (the last layer's) the 30 under it
    assert 30 * layer.mlp_remake_bytes <= predict(m, one).peak_bytes - predict(m, remade).peak_bytes
    assert predict(m, one).peak_bytes - predict(m, remade).peak_bytes <= 31 * layer.mlp_remake_bytes
    assert predict(m, remade).step_s - predict(m, one).step_s == pytest.approx(31 * layer.mlp_remake_s)
    three = Plan(recompute_layers=1, remake_mlp_layers=3)  # the first three of the 31 kept layers
    assert predict(m, one).peak_bytes - predict(m, three).peak_bytes == 3 * layer.mlp_remake_bytes
    without = replace(m, layers=tuple(replace(c, mlp_remake_bytes=0, mlp_remake_s=0.0) for c in m.layers))
    assert all(p.remake_mlp_layers == 0 for p in candidates(without))
    for gib in (12, 16):
        plan, old = choose(m, gib * GIB), choose(without, gib * GIB)
        assert plan.remake_mlp_layers != 0 and old.remake_mlp_layers == 0
        assert predict(m, plan).step_s < predict(without, old).step_s
        assert predict(m, plan).peak_bytes <= gib * GIB
    assert choose(m, 40 * GIB).remake_mlp_layers == 0  # room to keep everything: nothing to remake
    # where the trainer cannot remake, no plan offers it
    for opts in (MethodOptions(kind="qlora", lora_dropout=0.05), MethodOptions(kind="qlora", remake_activations=False)):
        assert costs_for(cfg, opts, 2, 1, 2048, torch.bfloat16, dev).layers[0].mlp_remake_bytes == 0
    moe = costs_for(_preset("mixtral-8x7b"), MethodOptions(kind="qlora", target_modules=("q_proj",)), 1, 1, 2048,
                    torch.bfloat16, dev)
    assert all(p.remake_mlp_layers == 0 for p in candidates(moe))
    long = costs_for(cfg, MethodOptions(kind="qlora"), 1, 1, 16384, torch.bfloat16, dev)
    assert not any(p.remake_mlp_layers for p in candidates(long) if p.mlp_chunk_tokens)
