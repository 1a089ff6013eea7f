"""Environments, worker paths and the 'unavailable' rows of CUDA-only toolkits, on a CPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.cli import env as env_cli
from harness.running import envs
from harness.spec.scenario import parse_scenario

REPO = Path(__file__).resolve().parents[2]


def _fake_env(root: Path, name: str) -> None:
    (root / name / "site").mkdir(parents=True)
    (root / name / "env.json").write_text(json.dumps({"python": sys.executable, "packages": [], "env_vars": {}}))


def test_environments_file_is_pinned_and_complete():
    cfg = env_cli.load_config()
    assert {"base", "trl", "unsloth", "llamafactory", "axolotl"} <= set(cfg)
    from adapters_for_tools import registry

    for name in ("trl", "unsloth", "llamafactory", "axolotl"):
        assert registry.info(name).env == name and name in cfg[name]["adapters"]
        assert all("==" in p for p in cfg[name]["packages"])
        assert not any(p.split("==")[0] in ("torch", "triton") or p.startswith("nvidia") for p in cfg[name]["packages"])


def test_worker_path_puts_overlay_before_repo_and_its_kernels_wins(tmp_path, monkeypatch):
    """Axolotl's PyPI `kernels` must shadow our repository's `kernels/` package in a worker."""
    from harness.running.envs import worker_environment

    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    _fake_env(tmp_path / "envs", "axolotl")
    site = tmp_path / "envs" / "axolotl" / "site"
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("FROM_OVERLAY = True\n")
    env = envs.resolve("axolotl")
    wenv = worker_environment(env)
    parts = wenv["PYTHONPATH"].split(":")
    assert parts.index(str(site)) < parts.index(str(REPO))
    work = tmp_path / "work"  # workers run with cwd = their work dir, never the repository root
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__, kernels.FROM_OVERLAY)"],
                         env=wenv, cwd=work, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(site)) and out.stdout.strip().endswith("True")


def test_base_overlay_follows_tool_overlay(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path))
    _fake_env(tmp_path, "trl")
    assert envs.resolve("base").pythonpath == []
    _fake_env(tmp_path, "base")
    assert envs.resolve("base").pythonpath == [str(tmp_path / "base" / "site")]
    assert envs.resolve("trl").pythonpath == [str(tmp_path / "trl" / "site"), str(tmp_path / "base" / "site")]
    assert not envs.resolve("unsloth").ready and "env create unsloth" in envs.resolve("unsloth").reason


def test_worker_imports_no_hf_library_before_the_adapter():
    """Unsloth must be imported before transformers/TRL/PEFT: the worker's own imports must not pull them in."""
    code = ("import sys, harness.running.worker, harness.measuring.meter, harness.measuring.effective, "
            "harness.inputs.data, harness.inputs.models, harness.spec.scenario, harness.measuring.environment, "
            "harness.measuring.flops, adapters_for_tools.registry as r; r.names(); "
            "import adapters_for_tools.unsloth.config, adapters_for_tools.trl.config; "
            "print(sorted(m for m in ('transformers', 'trl', 'peft', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(envs.has_cuda(), reason="checks the CPU-only behaviour")
def test_cuda_only_toolkits_are_recorded_unavailable(tmp_path, monkeypatch):
    from adapters_for_tools import registry
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    for name in ("unsloth", "axolotl", "llamafactory"):
        _fake_env(tmp_path / "envs", name)
        assert "needs CUDA" in envs.unavailable(registry.info(name), "cuda")
    sc = parse_scenario("""
version: 1
name: cuda_toolkits_on_cpu
model: {preset: tiny-llama, weights: random, dtype: bfloat16}
method: {kind: lora, lora_r: 4, lora_alpha: 8}
data: {source: synthetic, seq_len: 32}
train: {micro_batch: 1, steps: 2, warmup_steps: 1}
hardware: {device: cuda}
frameworks: [unsloth, axolotl, llamafactory]
measure: {timeout_s: 120}
""", "cuda_toolkits_on_cpu.yaml")
    sweep = runner.run_sweep(sc, tmp_path / "results", new=True, quiet=True)
    for name in ("unsloth", "axolotl", "llamafactory"):
        row = runner.load_result(sweep, name, 0)
        assert row["status"] == "unavailable" and "needs CUDA" in row["reason"], row


def test_prune_and_store_keeps_exceptions_and_fixes_record(tmp_path):
    w = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_cuda126.so", "bitsandbytes/libbitsandbytes_cpu.so",
             "bitsandbytes-0.50.2.dist-info/METADATA"]
    with zipfile.ZipFile(w, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n in names:
            z.writestr(n, "x" * 1000)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(f"{n},sha256=0,1000" for n in names) + "\n")
    pats = env_cli.load_config()["base"]["prune"]["bitsandbytes"]
    dropped, nbytes = env_cli.prune_and_store(w, pats)
    assert (dropped, nbytes) == (1, 1000)
    with zipfile.ZipFile(w) as z:
        kept = z.namelist()
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert "bitsandbytes/libbitsandbytes_cuda126.so" not in kept and "cuda126" not in record
    assert {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"} <= set(kept)


def test_wheel_fits_target_python():
    assert env_cli._wheel_fits("multiprocess-0.70.19-py312-none-any.whl", "3.12")
    assert not env_cli._wheel_fits("multiprocess-0.70.19-py311-none-any.whl", "3.12")
    assert env_cli._wheel_fits("tokenizers-0.22.2-cp39-abi3-manylinux_2_17_x86_64.whl", "3.12")
    assert env_cli._wheel_fits("trl-1.16.0-py3-none-any.whl", "3.12")
    assert not env_cli._wheel_fits("pydantic_core-2.41.5-cp311-cp311-manylinux_2_17_x86_64.whl", "3.12")
