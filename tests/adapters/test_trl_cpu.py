"""TRL trains the tiny scenario for real on the CPU through the harness, and matches the hf baseline.

Needs the trl environment: ``python -m harness env create trl`` (skipped with that message otherwise).
Same checkpoint, data, order and seed: TRL feeds the same token ids as the harness (``<bos> + text + <eos>``),
so every step sees the same tokens and the per-step losses agree up to float32 reduction-order noise
(measured: |dloss| <= 1e-6 over 12 steps on 2 CPU cores).
"""

from __future__ import annotations

import pytest

from harness.running import envs
from harness.spec.scenario import parse_scenario

pytestmark = pytest.mark.slow

SCENARIO = """
version: 1
name: trl_vs_hf_cpu
model: {preset: tiny-llama, weights: random, dtype: float32}
method: {kind: lora, lora_r: 8, lora_alpha: 16, target_modules: all-linear}
data: {source: synthetic, seq_len: 96, lengths: uniform, min_len: 40}
train: {micro_batch: 2, grad_accum: 2, steps: 4, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}
hardware: {device: cpu}
frameworks: [hf, trl]
measure: {timeout_s: 600}
"""


@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
def test_trl_matches_hf_on_cpu(tmp_path, monkeypatch):
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sc = parse_scenario(SCENARIO, "trl_vs_hf_cpu.yaml")
    sweep = runner.run_sweep(sc, tmp_path / "results", new=True, quiet=True)
    hf, trl = runner.load_result(sweep, "hf", 0), runner.load_result(sweep, "trl", 0)
    assert hf["status"] == "ok", hf.get("reason")
    assert trl["status"] == "ok", trl.get("reason")
    assert trl["valid"], trl["invalid_reasons"]
    assert trl["framework_version"] == envs.read_meta("trl")["packages"][0].split("==")[1]
    assert trl["native_config"].endswith("trl_sft.yaml") and "trl.scripts.sft" in trl["extra"]["rerun"]
    for a, b in zip(hf["steps"], trl["steps"], strict=True):
        assert (a["tokens"], a["loss_tokens"], a["samples"]) == (b["tokens"], b["loss_tokens"], b["samples"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)  # float32 on CPU; measured <= 1e-6
    keys = ("lora_r", "lora_alpha", "target_modules", "trainable_params", "gradient_checkpointing", "optimizer")
    assert {k: trl["effective"].get(k) for k in keys} == {k: hf["effective"].get(k) for k in keys}


@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
def test_packed_rows_joined_padding_free_are_read_as_the_micro_batch(tmp_path, monkeypatch):
    """With packing TRL's collator joins a micro-batch's packed rows into one padding-free row (the model sees one
    row of up to micro_batch x seq_len tokens): the micro-batch is read back from the rows it collated, so the run
    is valid at the scenario's micro-batch of 3."""
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    text = (SCENARIO.replace("min_len: 40}", "min_len: 8, packing: true}").replace("micro_batch: 2", "micro_batch: 3")
            .replace("frameworks: [hf, trl]", "frameworks: [trl]"))
    sweep = runner.run_sweep(parse_scenario(text, "packed.yaml"), tmp_path / "results", new=True, quiet=True)
    trl = runner.load_result(sweep, "trl", 0)
    assert trl["status"] == "ok", trl.get("reason")
    assert max(s["rows"] for s in trl["steps"]) == 1 and max(s["max_len"] for s in trl["steps"]) > 96  # joined
    assert trl["effective"]["micro_batch"] == 3 and trl["valid"], trl["invalid_reasons"]


@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
def test_multi_turn_messages_train_as_hf_does(tmp_path, monkeypatch):
    """Conversations with several assistant turns (which TRL's prompt/completion form cannot hold) go to TRL
    pre-tokenised by the harness: every step sees hf's tokens and loss tokens, and the losses agree."""
    import json

    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    turn = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue, then green"}]
    rows = [{"messages": [{"role": "system", "content": "be brief"}, *turn * (1 + i % 3)]} for i in range(16)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = SCENARIO.replace("{source: synthetic, seq_len: 96, lengths: uniform, min_len: 40}",
                            f"{{source: jsonl, path: {tmp_path / 'chat.jsonl'}, seq_len: 96}}")
    sweep = runner.run_sweep(parse_scenario(text, "chat.yaml"), tmp_path / "results", new=True, quiet=True)
    hf, trl = runner.load_result(sweep, "hf", 0), runner.load_result(sweep, "trl", 0)
    assert hf["status"] == trl["status"] == "ok", (hf.get("reason"), trl.get("reason"))
    assert trl["valid"], trl["invalid_reasons"]
    assert "pre-tokenised by the harness" in trl["extra"]["differences"][0]
    for a, b in zip(hf["steps"], trl["steps"], strict=True):
        assert (a["tokens"], a["loss_tokens"]) == (b["tokens"], b["loss_tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
