"""The tunebench adapter end to end through the harness worker (in process, CPU, tiny model)."""

from __future__ import annotations

import pytest

from harness.spec.scenario import parse_scenario
from tests.worker_run import run_first_row

SCENARIO = """
version: 1
name: tb_adapter_test
model: {{preset: tiny-llama, weights: random, dtype: float32, seed: 0}}
method: {{kind: {kind}, lora_r: 4, lora_alpha: 8, target_modules: all-linear}}
data: {{source: synthetic, seq_len: 48, lengths: uniform, min_len: 12, packing: {packing}}}
train: {{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}}
hardware: {{device: cpu}}
frameworks: [{{name: tunebench, overrides: {{offload_checkpoints: {offload}, fused_ce_chunk: 64{more}}}}}]
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("kind", "packing", "offload"), [("lora", False, False), ("full", True, True)])
def test_worker_run_is_valid(tmp_path, monkeypatch, kind, packing, offload):  # noqa: ANN001
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    more = (", offload_weights: 1, offload_embeddings: true, offload_lm_head: true" if kind == "lora"
            else ", recompute_layers: 1")
    sc = parse_scenario(SCENARIO.format(kind=kind, packing=str(packing).lower(), offload=str(offload).lower(),
                                        more=more))
    res = run_first_row(sc, tmp_path)
    work = tmp_path / "work"
    eff = res["effective"]
    assert eff["train_mode"] and eff["gradient_checkpointing"] and eff["optimizer"] == "adamw_torch"
    assert eff["quantization"] is None and eff["dtype"] == "float32"
    if kind == "lora":
        assert eff["lora_r"] == 4 and eff["lora_alpha"] == 8.0 and len(eff["target_modules"]) == 7
        assert (work / "output" / "adapter_model.safetensors").exists()
    else:
        assert eff["trainable_params"] == eff["total_params"]
        assert (work / "output" / "model.safetensors").exists()
        # packed rows: samples counted from position_ids resets (pads excluded), at least one per row; with
        # these lengths (12..48 in a 48-token row, packed in order) the first rows happen to hold one each
        rows = sum(st["rows"] * st["micro_batches"] for st in res["steps"])
        assert sum(st["samples"] for st in res["steps"]) >= rows
        assert max(st["max_sample_len"] for st in res["steps"]) <= 48
    assert res["extra"]["trainer"]["overrides"] == sc.frameworks[0].overrides
    assert res["extra"]["trainer"]["streamed_layers"] == ([0] if kind == "lora" else [])
    assert res["extra"]["trainer"]["recomputed_layers"] == ("all" if kind == "lora" else [0])
    losses = [s["loss"] for s in res["steps"]]
    assert len(losses) == 3 and all(loss is not None and 0 < loss < 10 for loss in losses)


def test_method_options_knobs():
    """Every knob the adapter documents reaches MethodOptions; an unknown one is refused by the typed model."""
    from types import SimpleNamespace

    from adapters_for_tools.tunebench.adapter import method_options

    m = SimpleNamespace(kind="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, quant=None,
                        resolved_targets=lambda: ["q_proj", "v_proj"])
    sc = SimpleNamespace(method=m, train=SimpleNamespace(gradient_checkpointing=True))
    o = method_options(sc, {"group_projections": False, "cuda_graph": True, "recompute_layers": 4})
    assert (o.group_projections, o.cuda_graph, o.recompute_layers) == (False, True, 4)
    d = method_options(sc, {})
    assert (d.group_projections, d.cuda_graph, d.recompute_layers) == (True, False, -1)
    with pytest.raises(ValueError, match=r"cuda_graphs\n  Extra inputs are not permitted"):
        method_options(sc, {"cuda_graphs": True})
    with pytest.raises(ValueError, match="recompute_layers"):
        method_options(sc, {"recompute_layers": "four"})
