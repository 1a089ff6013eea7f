"""Environment capture: what a result was measured on (hardware, driver, libraries, git sha)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

from harness.common.paths import REPO_ROOT

LIBRARIES = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "unsloth",
             "unsloth_zoo", "axolotl", "llamafactory", "litgpt", "lm_eval", "flash_attn", "liger_kernel",
             "tokenizers", "safetensors", "numpy", "pandas", "nvidia-ml-py")


# environment variables that can change what a run does or how fast it runs (our own knobs such as
# TUNEBENCH_NF4_DEQUANT, Triton / PyTorch / CUDA / NCCL settings): stored with every result
KNOB_PREFIXES = ("TUNEBENCH_", "TRITON_", "TORCH_", "PYTORCH_", "CUDA_", "CUBLAS", "NCCL_")


def knob_variables() -> dict[str, str]:
    """The set environment variables whose names start with one of :data:`KNOB_PREFIXES`, sorted."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(KNOB_PREFIXES)}


def git_info() -> dict:
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return proc.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    sha = git("rev-parse", "HEAD") or None
    if sha is None and (exported := os.environ.get("TUNEBENCH_GIT_SHA")):
        # a copy of the code without .git (`git archive` of one commit, as a GPU box receives it): the exporter
        # names the commit, and an archive is that commit exactly
        return {"git_sha": exported, "git_dirty": False}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    return {"git_sha": sha, "git_dirty": dirty}


def library_versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict:
    """GPU name, driver, memory, the cards' UUIDs and any foreign process on them, from NVML; empty values without a
    GPU."""
    info = {"gpu_name": None, "gpu_count": 0, "driver": None, "gpu_memory_gib": None, "foreign_gpu_processes": [],
            "nvml_error": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        n = pynvml.nvmlDeviceGetCount()
        info["gpu_count"] = n
        if n:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            info["gpu_name"] = pynvml.nvmlDeviceGetName(h)
            info["gpu_memory_gib"] = pynvml.nvmlDeviceGetMemoryInfo(h).total / 1024**3
            try:  # which cards: rows of one sweep measured on two machines of one kind are told apart by these
                info["gpu_uuids"] = [str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
                                     for i in range(n)]
            except pynvml.NVMLError:
                pass
            try:
                info["cuda_driver_version"] = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            except pynvml.NVMLError:
                pass
            me = os.getpid()
            for i in range(n):
                hi = pynvml.nvmlDeviceGetHandleByIndex(i)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(hi):
                    if p.pid != me:
                        info["foreign_gpu_processes"].append({"gpu": i, "pid": p.pid,
                                                              "used_gib": (p.usedGpuMemory or 0) / 1024**3})
    except Exception as e:  # no NVML here (CPU machine): leave the GPU fields empty
        info["nvml_error"] = f"{type(e).__name__}: {e}"
    return info


def machine_kind(env: dict) -> str | None:
    """The kind of machine runs measured in ``env`` (:func:`capture`) ran on, as far as their ratios go: the GPU
    model and count ("NVIDIA H100 80GB HBM3 x1"); None without a GPU."""
    name = env.get("gpu_name")
    return f"{name} x{env.get('gpu_count') or 1}" if name else None


def capture(with_torch: bool = True) -> dict:
    """Everything needed to tell two measurements apart. ``with_torch=False`` avoids importing torch."""
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "libraries": library_versions(),
        "variables": knob_variables(),
        **git_info(),
        **gpu_info(),
    }
    if with_torch:
        try:
            import torch

            env["torch_cuda"] = torch.version.cuda
            env["torch_cuda_available"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                env["cudnn"] = torch.backends.cudnn.version()
                env["torch_gpu_name"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
    return env
