"""How a run's worker starts: one process on one GPU, or one process per GPU through the framework's own launcher.

The runner (:mod:`harness.running.runner`) asks this module for the command and the environment; everything else
about a run (its environment, timeout, process group that dies with the runner, log, resume) is the same for one
process or several.

- One GPU (``hardware.strategy`` none): ``python -m harness.running.worker SPEC``.
- Several (``hardware.gpus: N`` with a strategy): N ranks of the worker, each running the adapter, started the way
  the tool's own multi-GPU command starts its ranks:

  - ``torchrun`` (``python -m torch.distributed.run --standalone --nproc-per-node N -m harness.running.worker
    SPEC``): hf and TRL (the Trainer reads the world from torchrun's environment and runs DDP, FSDP or DeepSpeed as
    its arguments say), tunebench, and LLaMA-Factory, whose ``llamafactory-cli train`` with ``FORCE_TORCHRUN=1``
    runs ``torchrun ... llamafactory/launcher.py``, each rank calling ``run_exp``: our ranks call the same
    ``run_exp``.
  - ``accelerate`` (``python -m accelerate.commands.launch --config_file accelerate_config.yaml -m
    harness.running.worker SPEC``, the config written into the run's folder): Axolotl, whose ``axolotl train``
    launches ``accelerate launch -m axolotl.cli.train``. FSDP and DeepSpeed settings stay in the tool's own
    configuration (Axolotl's YAML), as with the tool alone.

  ``--standalone`` (and a free port for accelerate): one host, a rendezvous on localhost, no port clash with
  another run. The scripts are called as modules: no console script travels to the GPU box (docs/environments.md).
- Environment for one host (:func:`distributed_environment`): NCCL over NVLink / PCIe and shared memory, no
  InfiniBand probing, and NVLink multicast (NVLS) off in NCCL, PyTorch and NVSHMEM: a program that uses it can put a
  shared host's GPUs out of service. One OpenMP thread pool per rank, the cores split between the ranks.
- Results: rank 0 writes ``worker_result.json`` with every rank's figures (:mod:`harness.running.ranks`); a rank
  whose tool raised writes ``worker_result.rank<k>.json`` and exits, torchrun then stops the others, and the runner
  records the first failure (:func:`failed_rank_result`).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import yaml

WORKER_MODULE = "harness.running.worker"
RESULT_NAME = "worker_result.json"
ACCELERATE_CONFIG = "accelerate_config.yaml"
LAUNCHERS = ("torchrun", "accelerate")

# set whatever the caller's environment says: NVLink multicast can take a shared host's GPUs out of service
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# defaults for one host, kept where the caller set them: peer-to-peer copies allowed (accelerate disables them on
# GPUs it thinks lack P2P unless the variable is set), no InfiniBand to probe, NCCL's warnings in the log
ONE_HOST = {"NCCL_P2P_DISABLE": "0", "NCCL_IB_DISABLE": "1", "NCCL_DEBUG": "WARN"}


def world_size(sc: Any) -> int:
    """Processes one run of scenario ``sc`` starts: ``hardware.gpus`` with a strategy, else 1."""
    return sc.hardware.gpus if sc.hardware.strategy else 1


def worker_command(python: str, spec_path: Path, sc: Any, launcher: str = "torchrun",
                   work_dir: Path | None = None) -> list[str]:
    """The command that runs one (framework, repeat) of ``sc``.

    Args:
        python: the framework environment's interpreter.
        spec_path: the run's ``spec.json``.
        sc: the scenario.
        launcher: the adapter's ``AdapterInfo.launcher`` (``torchrun`` or ``accelerate``).
        work_dir: the run's folder: the accelerate config is written there.

    Returns:
        argv for ``subprocess.Popen``.

    Raises:
        ValueError: an unknown launcher, or accelerate without a ``work_dir``.
    """
    n = world_size(sc)
    worker = ["-m", WORKER_MODULE, str(spec_path)]
    if n == 1:
        return [python, *worker]
    if launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *worker]
    if launcher == "accelerate":
        if work_dir is None:
            raise ValueError("accelerate launch needs the run's folder for its config file")
        cfg = Path(work_dir) / ACCELERATE_CONFIG
        cfg.write_text(yaml.safe_dump(accelerate_config(sc), sort_keys=False))
        return [python, "-m", "accelerate.commands.launch", "--config_file", str(cfg), *worker]
    raise ValueError(f"launcher {launcher!r}: one of {LAUNCHERS}")


def accelerate_config(sc: Any, port: int | None = None) -> dict[str, Any]:
    """``accelerate launch``'s config for ``sc``: N processes of one machine, plain multi-GPU (the tools that launch
    this way run on CUDA only).

    The tool configures FSDP or DeepSpeed itself from its own configuration (as ``axolotl train`` does under
    accelerate's defaults); precision too (``mixed_precision`` left to the tool's ``bf16``).
    """
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
            "machine_rank": 0, "num_processes": world_size(sc), "gpu_ids": "all", "main_process_ip": "127.0.0.1",
            "main_process_port": port or free_port(), "rdzv_backend": "static", "same_network": True,
            "use_cpu": False, "main_training_function": "main"}


def free_port() -> int:
    """A TCP port free on this host now (the rendezvous of one run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_environment(sc: Any, base: dict[str, str], cpu_count: int | None = None) -> dict[str, str]:
    """``base`` (the worker's environment) with what several ranks of one host need; ``base`` for one process.

    Args:
        sc: the scenario.
        base: the environment the runner gives every worker.
        cpu_count: cores to split between the ranks (default: this machine's).
    """
    n = world_size(sc)
    if n == 1:
        return dict(base)
    env = {**ONE_HOST, **base, **NO_MULTICAST}
    # torchrun sets 1 thread per rank when unset; the data-loading and CPU-side work of a rank gets its share
    env.setdefault("OMP_NUM_THREADS", str(max(1, (cpu_count or os.cpu_count() or 1) // n)))
    return env


def rank_result_path(work_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its result when its tool failed."""
    return Path(work_dir) / f"worker_result.rank{rank}.json"


def failed_rank_result(work_dir: Path) -> dict[str, Any] | None:
    """The result of the rank that failed first (by its ``finished_at``), its reason prefixed with the rank; None
    when no rank wrote one (they all finished, or one was killed: the runner classifies it from the log)."""
    found = []
    for p in sorted(Path(work_dir).glob("worker_result.rank*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            found.append(res)
    if not found:
        return None
    first = min(found, key=lambda r: (r.get("finished_at") or float("inf"), r.get("rank", 0)))
    return first | {"reason": f"rank {first.get('rank')}: {first.get('reason')}"}
