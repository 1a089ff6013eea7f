"""The common step hook: token counting, warmup split, statistics, CPU fields empty (not zero)."""

from __future__ import annotations

import torch

from harness.measuring.meter import StepMeter


def test_counts_non_padding_and_loss_tokens(tmp_path):
    m = StepMeter(warmup_steps=1, device="cpu", progress_path=tmp_path / "p.json")
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [5, 6, -100, -100]])
    for _ in range(3):
        m.step_begin()
        m.count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
        m.step_end(loss=1.5)
    s = m.steps[0]
    assert (s["tokens"], s["loss_tokens"], s["samples"], s["padded_tokens"], s["max_len"]) == (6, 3, 2, 8, 4)
    assert s["ctx_tokens_sq"] == 16 + 4
    out = m.finish()
    assert out["steps_measured"] == 2 and out["steps_total"] == 3
    assert out["tokens_measured"] == 12
    assert out["peak_vram_nvml_gib"] is None and out["peak_alloc_gib"] is None  # CPU: empty, not zero
    assert out["final_loss"] == 1.5
    assert (tmp_path / "p.json").exists()


def test_packed_rows_count_samples_from_position_ids():
    m = StepMeter(warmup_steps=0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m.step_begin()
    m.count_batch({"input_ids": torch.ones(1, 6, dtype=torch.long), "position_ids": pos})
    m.step_end()
    assert m.steps[0]["samples"] == 3
    assert m.steps[0]["ctx_tokens_sq"] == 9 + 4 + 1


def test_attach_counts_training_forwards_only():
    model = torch.nn.Embedding(10, 4)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e = model

        def forward(self, input_ids=None, attention_mask=None):
            return self.e(input_ids)

    w = Wrap()
    m = StepMeter(warmup_steps=0)
    m.attach(w)
    m.step_begin()
    w.train()
    w(input_ids=torch.ones(2, 3, dtype=torch.long))
    w.eval()
    w(input_ids=torch.ones(2, 3, dtype=torch.long))  # evaluation forwards are not training tokens
    m.step_end()
    assert m.steps[0]["tokens"] == 6


def test_step_end_without_begin_fails():
    m = StepMeter(warmup_steps=0)
    try:
        m.step_end()
    except RuntimeError as e:
        assert "step_begin" in str(e)
    else:
        raise AssertionError("step_end without step_begin must fail")
