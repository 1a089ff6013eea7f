"""The hand-loop tests' scenario (the ``tiny`` fixture of conftest.py writes it)."""

# uniform lengths: the micro-batches carry padding, so "non-padding tokens" is tested, not assumed
HANDLOOP_SCENARIO = """\
version: 1
name: handloop_test
model: {preset: tiny-llama, weights: random, dtype: float32, seed: 0}
method: {kind: lora, lora_r: 4, lora_alpha: 8, target_modules: all-linear}
data: {source: synthetic, seq_len: 48, lengths: uniform, min_len: 12}
train: {micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3, optimizer: adamw_torch,
        gradient_checkpointing: true}
hardware: {device: cpu}
frameworks: [hf, tunebench]
"""
