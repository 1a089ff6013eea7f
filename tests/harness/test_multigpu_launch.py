"""Multi-process runs (hardware.gpus with hardware.strategy) on a CPU: two gloo ranks through the real launch.

What a lent multi-GPU machine would show, checked here with processes instead of GPUs: the validation of strategies
per framework, the launch commands and environment, one result from two ranks (tokens counted on each and summed,
rank 0's clock, per-rank read-back), a failing rank recorded as a row, and the scaling table of the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.reporting import scaling
from harness.reporting.report import write_report
from harness.running import launch
from harness.running.derive import derive
from harness.running.runner import run_sweep
from harness.spec.scenario import ScenarioError, load_scenario, parse_scenario
from harness.storing import results
from harness.storing.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
BASE = """\
version: 1
name: {name}
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: {method}, lora_r: 4}}
data: {{seq_len: 32, lengths: uniform, min_len: 12}}
train: {{micro_batch: {micro}, steps: 4, warmup_steps: 1, lr: 1.0e-3}}
hardware: {hardware}
measure: {{timeout_s: 300}}
frameworks:
{frameworks}
"""


def _text(hardware: str = "{device: cpu, gpus: 2, strategy: ddp}", frameworks: str = "  - tunebench",
          method: str = "lora", micro: int = 2, name: str = "mp") -> str:
    return BASE.format(name=name, hardware=hardware, frameworks=frameworks, method=method, micro=micro)


def _sc(tmp_path: Path, **kw):  # noqa: ANN003, ANN202
    text = _text(**kw)
    p = tmp_path / f"{kw.get('name', 'mp')}.yaml"
    p.write_text(text)
    return parse_scenario(text, str(p))


def _problems(text: str) -> str:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "s.yaml")
    return str(e.value)


# -- validation -----------------------------------------------------------------------------------------------------
def test_several_gpus_need_a_strategy_and_a_strategy_several_gpus():
    assert "2 GPUs need hardware.strategy" in _problems(_text(hardware="{device: cuda, gpus: 2}"))
    assert "give hardware.gpus > 1" in _problems(_text(hardware="{device: cuda, strategy: ddp}"))
    assert "zero3 (DeepSpeed ZeRO-3) needs device cuda" in _problems(
        _text(hardware="{device: cpu, gpus: 2, strategy: zero3}", frameworks="  - hf"))
    assert "unknown" not in _problems(_text(hardware="{device: cuda, gpus: 2, strategy: tp}"))  # an enum error
    parse_scenario(_text(), "s.yaml")  # on a cpu, gpus counts gloo processes


def test_each_framework_is_validated_against_its_own_strategies():
    unsloth = _problems(_text(hardware="{device: cuda, gpus: 2, strategy: ddp}", frameworks="  - unsloth"))
    assert "strategy 'ddp' not supported (Unsloth's open-source version trains on one GPU only)" in unsloth
    litgpt = _problems(_text(hardware="{device: cuda, gpus: 2, strategy: fsdp}", frameworks="  - litgpt"))
    assert "strategy 'fsdp' not supported (runs on one GPU only)" in litgpt
    dora = _problems(_text(hardware="{device: cuda, gpus: 2, strategy: fsdp}", method="dora"))
    assert "strategy 'fsdp' with method 'dora' not supported (with fsdp: ['full', 'lora', 'qlora'])" in dora
    full_ddp = _problems(_text(hardware="{device: cuda, gpus: 4, strategy: ddp}", method="full"))
    assert "strategy 'ddp' with method 'full' not supported" in full_ddp
    for fw in ("hf", "trl", "axolotl", "llamafactory", "tunebench"):
        parse_scenario(_text(hardware="{device: cuda, gpus: 4, strategy: fsdp}", frameworks=f"  - {fw}",
                             method="qlora"), "s.yaml")


def test_one_gpu_scenarios_keep_their_resolved_form_and_hash():
    sc = parse_scenario(_text(hardware="{device: cpu}"), "s.yaml")
    assert "strategy" not in sc.to_dict()["hardware"]
    assert sc.content_hash() == parse_scenario(_text(hardware="{device: cpu, gpus: 1}"), "s.yaml").content_hash()
    multi = parse_scenario(_text(), "s.yaml")
    assert multi.to_dict()["hardware"]["strategy"] == "ddp" and multi.content_hash() != sc.content_hash()


@pytest.mark.parametrize(("name", "strategy", "method"), [("llama8b_lora_ddp", "ddp", "lora"),
                                                         ("llama8b_full_fsdp", "fsdp", "full"),
                                                         ("llama70b_qlora_fsdp", "fsdp", "qlora")])
def test_shipped_multi_gpu_scenarios_and_their_other_gpu_counts(name, strategy, method):
    sc = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert (sc.hardware.gpus, sc.hardware.strategy, sc.method.kind) == (2, strategy, method)
    assert sc.framework_names() == ["hf", "trl", "axolotl", "llamafactory", "tunebench"]
    four = derive(sc, hardware={"gpus": 4})  # what `run --gpus 4` runs
    one = derive(sc, hardware={"gpus": 1, "strategy": None})  # `run --gpus 1`: the scaling reference
    assert four.hardware.strategy == strategy and one.hardware.strategy is None
    key = scaling.settings_key
    assert key(one.to_dict(), "hf") == key(sc.to_dict(), "hf") == key(four.to_dict(), "hf")
    assert key(one.to_dict(), "hf") != key(one.to_dict(), "tunebench")


# -- the launch -----------------------------------------------------------------------------------------------------
def test_commands_one_process_torchrun_and_accelerate(tmp_path):
    one = _sc(tmp_path, hardware="{device: cpu}")
    assert launch.worker_command("py", Path("s.json"), one) == ["py", "-m", "harness.running.worker", "s.json"]
    two = _sc(tmp_path)
    assert launch.worker_command("py", Path("s.json"), two) == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "harness.running.worker",
        "s.json"]
    cmd = launch.worker_command("py", Path("s.json"), two, "accelerate", tmp_path)
    assert cmd[:4] == ["py", "-m", "accelerate.commands.launch", "--config_file"]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(Path(cmd[4]).read_text())))
    assert cfg["num_processes"] == 2 and cfg["distributed_type"] == "MULTI_GPU" and cfg["num_machines"] == 1
    with pytest.raises(ValueError, match="launcher 'mpirun'"):
        launch.worker_command("py", Path("s.json"), two, "mpirun")


def test_one_host_environment_keeps_multicast_off_whatever_the_caller_set(tmp_path):
    two = _sc(tmp_path)
    env = launch.distributed_environment(two, {"NCCL_NVLS_ENABLE": "1", "NCCL_P2P_DISABLE": "1", "PATH": "/bin"},
                                         cpu_count=16)
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["NCCL_IB_DISABLE"] == "1"
    assert env["NCCL_P2P_DISABLE"] == "1" and env["PATH"] == "/bin"  # the caller's own choice stays
    assert env["OMP_NUM_THREADS"] == "8"
    assert launch.distributed_environment(_sc(tmp_path, hardware="{device: cpu}"), {"A": "1"}) == {"A": "1"}


def test_the_first_failing_rank_is_the_row(tmp_path):
    for rank, at, reason in ((1, 20.0, "NCCL timeout"), (0, 10.0, "OutOfMemoryError: CUDA out of memory")):
        launch.rank_result_path(tmp_path, rank).write_text(json.dumps(
            {"rank": rank, "status": "oom" if rank == 0 else "error", "reason": reason, "finished_at": at}))
    res = launch.failed_rank_result(tmp_path)
    assert res["status"] == "oom" and res["reason"] == "rank 0: OutOfMemoryError: CUDA out of memory"
    assert launch.failed_rank_result(tmp_path / "none") is None


# -- each tool's own multi-GPU configuration ------------------------------------------------------------------------
def test_trainer_based_tools_get_their_strategy_as_training_arguments(tmp_path):
    from adapters_for_tools import distributed
    from adapters_for_tools.hf import HfOverrides
    from adapters_for_tools.hf.config import training_args
    from adapters_for_tools.llamafactory.config import native_config as lf_config
    from adapters_for_tools.trl.config import native_config as trl_config

    cuda = "{device: cuda, gpus: 2, strategy: %s}"
    assert distributed.trainer_args(_sc(tmp_path, hardware="{device: cuda}"), tmp_path) == {}
    ddp = training_args(_sc(tmp_path, hardware=cuda % "ddp"), tmp_path, HfOverrides())
    assert ddp["ddp_find_unused_parameters"] is False and "fsdp" not in ddp and "deepspeed" not in ddp
    fsdp = _sc(tmp_path, hardware=cuda % "fsdp", method="qlora")
    for args in (training_args(fsdp, tmp_path, HfOverrides()), trl_config(fsdp, tmp_path, "ckpt", tmp_path, "text"),
                 lf_config(fsdp, tmp_path, "ckpt", tmp_path)):
        assert args["fsdp"] == "full_shard auto_wrap" and args["fsdp_config"]["fsdp_version"] == 2
    assert trl_config(fsdp, tmp_path, "ckpt", tmp_path, "text")["bnb_4bit_quant_storage"] == fsdp.model.dtype
    assert distributed.sharded_4bit(fsdp) and not distributed.sharded_4bit(_sc(tmp_path, hardware=cuda % "ddp"))
    zero3 = training_args(_sc(tmp_path, hardware=cuda % "zero3", frameworks="  - hf"), tmp_path, HfOverrides())
    ds = json.loads(Path(zero3["deepspeed"]).read_text())  # written into the run's folder
    assert Path(zero3["deepspeed"]).parent == tmp_path and ds["zero_optimization"]["stage"] == 3


def test_axolotl_gets_its_own_fsdp_and_deepspeed_keys(tmp_path):
    from adapters_for_tools import distributed
    from adapters_for_tools.axolotl.config import native_config

    assert distributed.decoder_layer_class({"architectures": ["Qwen2ForCausalLM"]}) == "Qwen2DecoderLayer"
    assert distributed.decoder_layer_class({}) is None
    cuda = "{device: cuda, gpus: 4, strategy: %s}"
    cfg = native_config(_sc(tmp_path, hardware=cuda % "fsdp", method="qlora"), tmp_path, "ckpt", tmp_path, "text",
                        layer_class="LlamaDecoderLayer")
    assert cfg["fsdp_version"] == 2 and cfg["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert cfg["bnb_config_kwargs"]["bnb_4bit_quant_storage"] == "bfloat16"
    zero3 = native_config(_sc(tmp_path, hardware=cuda % "zero3", frameworks="  - axolotl"), tmp_path, "ckpt", tmp_path,
                          "text")
    assert zero3["deepspeed"].endswith("deepspeed_zero3.json") and "fsdp_config" not in zero3
    ddp = native_config(_sc(tmp_path, hardware=cuda % "ddp"), tmp_path, "ckpt", tmp_path, "text")
    assert not {"fsdp_config", "deepspeed"} & set(ddp)  # DDP is the launch alone


# -- two gloo ranks through the runner ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One checkpoint cache and work area for the module's sweeps (the tiny checkpoint is built once)."""
    root = tmp_path_factory.mktemp("mp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(root / "cache"))
        mp.setenv("TUNEBENCH_WORK", str(root / "work"))
        mp.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
        yield root


@pytest.fixture(scope="module")
def sweeps(root) -> dict[str, Path]:
    """LoRA: tunebench and hf on two ranks of micro-batch 2 (DDP); tunebench on one process of micro-batch 4 (the
    same global batch), and of micro-batch 2 (the same per-device settings: the scaling reference)."""
    return {"ddp": run_sweep(_sc(root, name="mp_ddp", frameworks="  - tunebench\n  - hf"), root / "results",
                             quiet=True),
            "one": run_sweep(_sc(root, name="mp_one", hardware="{device: cpu}", micro=4), root / "results", quiet=True),
            "ref": run_sweep(_sc(root, name="mp_ref", hardware="{device: cpu}"), root / "results", quiet=True)}


def _run(d: Path, framework: str = "tunebench") -> dict:
    (row,) = [r for r in results.load_runs(d) if r["framework"] == framework]
    return row


@pytest.mark.slow
def test_two_ranks_make_one_valid_row(sweeps):
    row = _run(sweeps["ddp"])
    assert row["status"] == "ok" and row["valid"], (row.get("reason"), row.get("invalid_reasons"))
    assert row["effective"]["world_size"] == 2 and row["effective"]["strategy"] == "ddp"
    assert row["effective"]["micro_batch"] == 2  # per device, as the scenario says
    assert row["metrics"]["world_size"] == 2
    assert row["metrics"]["peak_vram_nvml_gib_per_gpu"] == [None, None]  # a cpu: no GPU memory, one entry a rank
    ranks = row["extra"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["micro_batch"] == 2 for r in ranks)


@pytest.mark.slow
def test_the_hf_trainer_under_torchrun_reads_and_learns_the_same(sweeps):
    """hf's Trainer runs its own DDP (accelerate, gloo here) on the same launch: the same rows per step and rank as
    our trainer's split, the same loss normalisation over the global batch, so the same per-step losses."""
    hf, ours = _run(sweeps["ddp"], "hf"), _run(sweeps["ddp"])
    assert hf["status"] == "ok" and hf["valid"], (hf.get("reason"), hf.get("invalid_reasons"))
    assert hf["effective"]["strategy"] == "ddp" and hf["effective"]["world_size"] == 2  # read from accelerate
    assert [r["tokens"] for r in hf["extra"]["ranks"]] == [r["tokens"] for r in ours["extra"]["ranks"]]
    assert [s["loss"] for s in hf["steps"]] == pytest.approx([s["loss"] for s in ours["steps"]], abs=1e-5)


@pytest.mark.slow
def test_tokens_of_every_rank_are_summed(sweeps):
    ddp, one = _run(sweeps["ddp"]), _run(sweeps["one"])
    assert one["status"] == "ok", one.get("reason")
    # the same rows per optimizer step: two ranks of 2 read what one process of 4 reads
    assert [s["tokens"] for s in ddp["steps"]] == [s["tokens"] for s in one["steps"]]
    assert [s["loss_tokens"] for s in ddp["steps"]] == [s["loss_tokens"] for s in one["steps"]]
    per_rank = [r["tokens"] for r in ddp["extra"]["ranks"]]
    assert all(t > 0 for t in per_rank) and sum(per_rank) == sum(s["tokens"] for s in ddp["steps"])
    assert ddp["metrics"]["tokens_measured"] == one["metrics"]["tokens_measured"]
    # the same global batch, the gradients summed over ranks: the same losses (fp32 summation order apart)
    assert [s["loss"] for s in ddp["steps"]] == pytest.approx([s["loss"] for s in one["steps"]], abs=1e-5)


@pytest.mark.slow
def test_a_failing_rank_is_a_row_with_its_reason(root, sweeps):
    # an argument only the tool knows it lacks: each rank's TrainingArguments refuses it as the tool starts
    sc = _sc(root, name="mp_fail", frameworks="  - {name: hf, overrides: {training_args: {no_such_argument: 1}}}")
    row = _run(run_sweep(sc, root / "failing", quiet=True), "hf")
    assert row["status"] == "error" and row["reason"].startswith("rank "), row["reason"]
    assert "no_such_argument" in row["reason"]


@pytest.mark.slow
def test_scaling_against_the_one_gpu_run_of_the_same_settings(sweeps):
    ddp, ref = _run(sweeps["ddp"]), _run(sweeps["ref"])
    # the micro-batch 4 sweep is one GPU too, but of other settings: never the reference
    rows = {r.framework: r for r in scaling.scaling_rows([sweeps["ddp"], sweeps["one"], sweeps["ref"]])}
    row = rows["tunebench"]
    assert rows["hf"].reference_sweep is None  # no one-GPU hf run stored
    assert (row.framework, row.strategy, row.gpus, row.reference_sweep) == ("tunebench", "ddp", 2, sweeps["ref"].name)
    assert row.efficiency == pytest.approx(ddp["metrics"]["tokens_per_s"] / (2 * ref["metrics"]["tokens_per_s"]))
    (found,) = scaling.reference_sweeps(load_sweep(sweeps["ddp"]))  # the same, found beside the sweep
    assert found.path == sweeps["ref"]


@pytest.mark.slow
def test_report_has_the_scaling_section_and_who_cannot_run(sweeps, tmp_path):
    md = write_report(sweeps["ddp"], tmp_path / "report").read_text()
    assert "# Scaling over 2 GPUs (ddp)" in md and sweeps["ref"].name in md
    assert "unsloth: strategy 'ddp' not supported (Unsloth's open-source version trains on one GPU only)" in md
    assert "# Scaling" not in write_report(sweeps["ref"], tmp_path / "ref").read_text()


# -- on a multi-GPU machine (the lead's: `python -m pytest -q -m gpu tests/harness/test_multigpu_launch.py`) ---------
GPU_ROWS = [("hf", "ddp", "lora"), ("hf", "fsdp", "full"), ("hf", "fsdp", "qlora"), ("trl", "ddp", "lora"),
            ("trl", "fsdp", "full"), ("axolotl", "ddp", "lora"), ("axolotl", "fsdp", "qlora"),
            ("llamafactory", "ddp", "lora"), ("llamafactory", "fsdp", "full"), ("tunebench", "ddp", "lora"),
            ("tunebench", "ddp", "qlora"), ("tunebench", "fsdp", "full"), ("tunebench", "fsdp", "qlora")]


@pytest.mark.gpu
@pytest.mark.parametrize(("framework", "strategy", "method"), GPU_ROWS, ids=["-".join(r) for r in GPU_ROWS])
def test_every_framework_on_two_gpus(framework, strategy, method, tmp_path, monkeypatch):
    import torch

    from adapters_for_tools import registry
    from harness.running import envs

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if why := envs.unavailable(registry.info(framework), "cuda"):
        pytest.skip(why)
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    text = _text(hardware=f"{{device: cuda, gpus: 2, strategy: {strategy}}}", frameworks=f"  - {framework}",
                 method=method).replace("dtype: float32", "dtype: bfloat16")
    (tmp_path / "s.yaml").write_text(text)
    row = _run(run_sweep(parse_scenario(text, str(tmp_path / "s.yaml")), tmp_path / "results", quiet=True))
    assert row["status"] == "ok" and row["valid"], (row.get("reason"), row.get("invalid_reasons"))
    assert row["effective"]["world_size"] == 2 and row["effective"]["strategy"] == strategy
    peaks = row["metrics"]["peak_vram_nvml_gib_per_gpu"]
    assert len(peaks) == 2 and all(p and p > 0 for p in peaks), peaks  # each rank sampled its own GPU
    assert all(r["tokens"] > 0 for r in row["extra"]["ranks"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
