"""What a run records of its machine (harness.measuring.environment.gpu_info), read through a stand-in of NVML."""

from __future__ import annotations

import os
import sys
import types

from harness.measuring import environment


class _NVMLError(Exception):
    pass


def _nvml(cards: list[str], uuids_fail: bool = False) -> types.ModuleType:
    """A pynvml of ``cards`` (their UUIDs), each an H100 holding this process and one other."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError

    def uuid(i: int) -> str:
        if uuids_fail:
            raise _NVMLError("not supported")
        return cards[i]

    proc = types.SimpleNamespace
    m.nvmlInit = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "580.159.04"
    m.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    m.nvmlDeviceGetCount = lambda: len(cards)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 1024**3)
    m.nvmlDeviceGetUUID = uuid
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [proc(pid=os.getpid(), usedGpuMemory=1024**3),
                                                        proc(pid=4242, usedGpuMemory=2 * 1024**3)]
    return m


def test_the_cards_are_recorded_with_the_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _nvml(["GPU-aaaa", "GPU-bbbb"]))
    info = environment.gpu_info()
    assert (info["gpu_name"], info["gpu_count"], info["gpu_uuids"]) == ("NVIDIA H100 80GB HBM3", 2,
                                                                         ["GPU-aaaa", "GPU-bbbb"])
    assert environment.machine_kind(info) == "NVIDIA H100 80GB HBM3 x2"
    assert [p["pid"] for p in info["foreign_gpu_processes"]] == [4242, 4242] and info["nvml_error"] is None


def test_a_card_without_a_uuid_leaves_the_rest_recorded(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _nvml(["GPU-aaaa"], uuids_fail=True))
    info = environment.gpu_info()
    assert "gpu_uuids" not in info and info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["nvml_error"] is None


def test_no_gpu_means_no_machine_kind(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: a CPU machine without NVML
    info = environment.gpu_info()
    assert info["gpu_name"] is None and info["nvml_error"] and environment.machine_kind(info) is None
