"""hf Liger rows trained for real on the CPU through the harness: a switch that took effect leaves the row valid,
one that did not marks it invalid, and the plain row records that it ran without.

liger-kernel's Triton kernels need a GPU, so the `base` overlay here carries a stand-in ``liger_kernel`` whose
``_apply_liger_kernel_to_instance`` (what ``Trainer`` calls for ``use_liger_kernel``) binds a Liger-named RMSNorm
forward (plain PyTorch, same math) when called with ``rms_norm=True``, and silently does nothing with
``rms_norm=False``: a flag a tool accepts and ignores, the case the read-back exists for.
"""

from __future__ import annotations

import json
import sys

import pytest

from harness.spec.scenario import parse_scenario

pytestmark = pytest.mark.slow

SCENARIO = """
version: 1
name: liger_rows_cpu
model: {preset: tiny-llama, weights: random, dtype: float32}
method: {kind: lora, lora_r: 8, lora_alpha: 16, target_modules: all-linear}
data: {source: synthetic, seq_len: 64, lengths: fixed}
train: {micro_batch: 2, grad_accum: 1, steps: 3, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}
hardware: {device: cpu}
frameworks:
  - hf
  - {name: hf, label: hf-liger, overrides: {liger: true, training_args: {liger_kernel_config: {rms_norm: true}}}}
  - {name: hf, label: hf-liger-ignored, overrides: {liger: true,
                                                    training_args: {liger_kernel_config: {rms_norm: false}}}}
measure: {timeout_s: 300}
"""

STAND_IN = '''
"""Stand-in for liger-kernel's transformers entry point (tests only)."""
import torch


class LigerRMSNorm(torch.nn.Module):
    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _apply_liger_kernel_to_instance(model=None, rms_norm=True, **kwargs):
    if not rms_norm:
        return  # accepted and ignored
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.__dict__["forward"] = LigerRMSNorm.forward.__get__(module)
'''


def _base_overlay_with_stand_in(envs_root) -> None:
    site = envs_root / "base" / "site"
    (site / "liger_kernel" / "transformers").mkdir(parents=True)
    (site / "liger_kernel" / "__init__.py").write_text('__version__ = "0.8.5"\n')
    (site / "liger_kernel" / "transformers" / "__init__.py").write_text(STAND_IN)
    info = site / "liger_kernel-0.8.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: liger-kernel\nVersion: 0.8.5\n")
    (envs_root / "base" / "env.json").write_text(json.dumps({"python": sys.executable, "packages": [],
                                                             "env_vars": {}}))


def test_liger_rows_are_read_back_from_the_live_model(tmp_path, monkeypatch):
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    _base_overlay_with_stand_in(tmp_path / "envs")
    sc = parse_scenario(SCENARIO, "liger_rows_cpu.yaml")
    sweep = runner.run_sweep(sc, tmp_path / "results", new=True, quiet=True)
    plain, liger, ignored = (runner.load_result(sweep, key, 0) for key in ("hf", "hf-liger", "hf-liger-ignored"))
    for run in (plain, liger, ignored):
        assert run["status"] == "ok", run.get("reason")

    assert plain["valid"], plain["invalid_reasons"]
    assert plain["extra"]["switches"] == {"liger_kernel": False} and plain["effective"]["liger_kernel"] is False
    assert plain["effective"]["checkpoint_function"] == "torch.utils.checkpoint.checkpoint(use_reentrant=False)"
    # the Trainer's per-micro-batch NaN/Inf loss check (a device sync), read back from its arguments
    assert plain["effective"]["logging_nan_inf_filter"] is True

    assert liger["valid"], liger["invalid_reasons"]
    assert liger["extra"]["switches"] == {"liger_kernel": True}
    # tiny-llama: 2 layers x 2 norms + the final norm
    assert liger["effective"]["liger_kernel"] is True and liger["effective"]["liger_patches"] == {"LigerRMSNorm": 5}
    for a, b in zip(plain["steps"], liger["steps"], strict=True):  # same math: same losses
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)

    assert not ignored["valid"] and ignored["effective"]["liger_kernel"] is False
    assert ignored["invalid_reasons"] == ["not honoured: switch liger_kernel: asked for True, the live run has False"]
