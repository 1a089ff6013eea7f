"""The NVML sampler on a fake driver: in its monitor process (a fake ``pynvml`` module first on the monitor's path),
in the thread it falls back to, and the monitor's end when the run's process goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from harness.measuring.nvml_sampler import NVML_READINGS, GpuMemorySampler, process_used_bytes
from harness.storing.schema import Metrics

FAKE = textwrap.dedent('''
    """A fake pynvml: one GPU whose memory grows with each query, this process (FAKE_PID) and a foreign one on it,
    power rising with each reading under the software power cap; each memory query takes a millisecond."""
    import os
    import time
    from types import SimpleNamespace

    class NVMLError(Exception):
        pass

    _n = {"mem": 0, "power": 0}
    PID = int(os.environ["FAKE_PID"])

    def nvmlInit():
        pass

    def nvmlShutdown():
        pass

    def nvmlDeviceGetHandleByIndex(i):
        return f"gpu{i}"

    def nvmlDeviceGetMemoryInfo(h):
        time.sleep(0.001)
        _n["mem"] += 1
        return SimpleNamespace(used=min(_n["mem"], 20) * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(h):
        return [SimpleNamespace(pid=PID, usedGpuMemory=min(_n["mem"], 20) * 2**29),
                SimpleNamespace(pid=4242, usedGpuMemory=2**30)]

    def nvmlDeviceGetGraphicsRunningProcesses(h):
        raise NVMLError("not supported")

    def nvmlDeviceGetPowerUsage(h):
        _n["power"] += 1
        return 300_000 + 1000 * _n["power"]

    def nvmlDeviceGetEnforcedPowerLimit(h):
        return 700_000

    def nvmlDeviceGetPowerManagementDefaultLimit(h):
        return 700_000

    def nvmlDeviceGetClockInfo(h, kind):
        return 1980

    def nvmlDeviceGetTemperature(h, sensor):
        return 60

    def nvmlDeviceGetCurrentClocksEventReasons(h):
        return 0x4

    def nvmlDeviceGetTotalEnergyConsumption(h):
        return 1_000_000
''')


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    """The fake ``pynvml`` importable here and in the monitor process (its folder first on PYTHONPATH)."""
    (tmp_path / "pynvml.py").write_text(FAKE)
    monkeypatch.setenv("FAKE_PID", str(os.getpid()))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    yield
    sys.modules.pop("pynvml", None)


def _sample_for(sampler: GpuMemorySampler, seconds: float) -> GpuMemorySampler:
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    return sampler


def _check_peaks(s: GpuMemorySampler) -> None:
    assert s.error is None
    assert s.samples >= 10
    assert s.baseline_device_bytes == 2**30  # the first query, before sampling
    assert s.peak_device_bytes == 20 * 2**30 and s.peak_process_bytes == 10 * 2**30
    assert s.foreign == {4242: 2**30}
    tel = s.telemetry.summary(1.0, 10)
    assert tel["power_capped"] and not tel["throttled"]  # the power cap seen while sampling reached the run
    peak, start = tel["telemetry"]["peak_power"], tel["telemetry"]["start"]
    assert peak is not None and peak["power_w"] > start["power_w"]
    assert 1 < s.busy_pct < 80  # ~1 ms of each ~6 ms cycle, with slack for a loaded CI machine
    got = s.readings()  # what a run stores
    assert tuple(got) == NVML_READINGS and Metrics(**got).nvml_sampler == s.mode
    assert got["peak_vram_nvml_gib"] == 10.0 and got["foreign_gpu_processes"] == [{"pid": 4242, "max_gib": 1.0}]


def test_the_monitor_process_samples_beside_the_run(fake_nvml):
    """The default: a monitor process; its peaks, the foreign process, the telemetry at peak power and the
    throttle reasons it saw reach the run's sampler."""
    s = _sample_for(GpuMemorySampler(interval_s=0.005), 0.5)
    assert s.mode == "process" and s.mode_reason is None
    _check_peaks(s)


def test_a_monitor_that_cannot_start_falls_back_to_a_thread(fake_nvml, monkeypatch):
    """No monitor process (here: its interpreter is missing): the same sampling in a thread, and the reason."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    s = _sample_for(GpuMemorySampler(interval_s=0.005), 0.5)
    assert s.mode == "thread" and "monitor process did not start" in s.mode_reason
    _check_peaks(s)


def test_the_monitor_ends_when_the_run_goes_away(fake_nvml):
    """Its input closing (the run's process died) ends the monitor with its result, not an orphan sampling on."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.measuring.nvml_sampler", "--pid", str(os.getpid()),
                             "--index", "0", "--interval", "0.01"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    res = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert res["samples"] >= 1 and res["error"] is None and res["foreign"] == {"4242": 2**30}


def test_no_driver_means_no_sampling_and_says_why(monkeypatch):
    """Without NVML nothing starts and the error names the cause."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    s = GpuMemorySampler().start()
    assert not s.available and s.mode is None and "pynvml" in s.error
    s.stop()
    assert s.samples == 0 and s.busy_pct is None


@pytest.mark.gpu
def test_the_monitor_process_sees_this_process_on_the_gpu():
    """On a real GPU and driver: the monitor process runs (no fallback) and sees this process's memory grow by what
    it allocates, as the run's peak."""
    import torch

    torch.cuda.init()
    s = GpuMemorySampler(interval_s=0.005).start()
    assert s.mode == "process", s.mode_reason
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # 2 GiB
    torch.cuda.synchronize()
    time.sleep(0.3)
    del x
    s.stop()
    assert s.error is None and s.samples >= 10
    assert s.peak_process_bytes >= 2 * 2**30 and s.peak_device_bytes >= s.peak_process_bytes
    assert s.telemetry.summary(None, None)["telemetry"]["start"]["sm_clock_mhz"] is not None


def test_a_process_gpu_memory_is_read_by_its_pid(fake_nvml, monkeypatch):
    """What the memory cap takes off a budget for the CUDA context: NVML's figure for this process; None for a
    process NVML does not list (a container's own pids) and without a driver."""
    assert process_used_bytes(0) == 0  # the fake's first reading for this process
    assert process_used_bytes(0, pid=1) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert process_used_bytes(0) is None
