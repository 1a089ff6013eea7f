"""NVML sampling of a run's GPU memory and telemetry, in a process of its own.

Every 10 ms (``measure.memory_interval_ms``) the sampler reads the device's used memory and the memory of each
process on the GPU (this run's, and any other process's: someone else's load), and every tenth time the clocks,
power, temperature and throttle reasons (keeping the reading of the highest power draw). Those calls go through
pynvml, whose Python around each driver call needs the interpreter lock: run as a thread inside the training
process, the sampler took the lock from the training loop about 100 times a second, which costs a tool with much
Python per step (Unsloth's offloaded checkpoints) more than one without. So the sampler runs as a small separate
process (``python -m harness.measuring.nvml_sampler``) that shares no interpreter with the run it measures; if that
process cannot start, the same sampling runs as a thread and the run says so (``nvml_sampler``).

The monitor process reads the pid it watches and the device from its arguments, writes ``ready`` once it has
sampled, samples until its standard input says ``stop`` or closes (the run ended or died), and writes one JSON
line with what it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

from harness.measuring.telemetry import GpuTelemetry

TELEMETRY_EVERY = 10  # clocks/power/temperature every 10th memory sample (~100 ms): 5 NVML calls each
READY_TIMEOUT_S = 60.0
# the run metrics GpuMemorySampler.readings() gives (all None where nothing is sampled: a CPU run)
NVML_READINGS = ("peak_vram_nvml_gib", "peak_vram_device_gib", "vram_device_before_gib", "nvml_samples",
                 "nvml_sampler_busy_pct", "nvml_sampler", "nvml_sampler_note", "nvml_error", "foreign_gpu_processes")


def nvml_index(device_index: int) -> int:
    """NVML's index of the run's ``device_index``-th visible GPU (``CUDA_VISIBLE_DEVICES`` maps torch's indices;
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, set by the runner, makes the orders agree)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return int(visible.split(",")[device_index]) if visible and visible.split(",")[0].isdigit() else device_index


def process_used_bytes(device_index: int, pid: int | None = None) -> int | None:
    """NVML's GPU memory of process ``pid`` (default: this one) on the run's ``device_index``-th visible GPU; None
    where NVML cannot say (no NVML, or a container whose process ids NVML does not show)."""
    pid = pid or os.getpid()
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or driver here: nothing to read
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device_index))
        used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == pid and p.usedGpuMemory is not None]
        return sum(used) if used else None
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


class Peaks:
    """What the sampling saw: this process's and the device's peak memory, other processes' memory, the
    telemetry reading at the highest power draw, the throttle reasons, and how long the sampling itself took."""

    def __init__(self, nvml: Any, handle: Any, pid: int, ignore_pids: set[int]):
        self.nv, self.handle, self.pid, self.ignore_pids = nvml, handle, pid, ignore_pids
        self.telemetry = GpuTelemetry(nvml, handle)
        self.peak_process_bytes: int | None = None
        self.peak_device_bytes: int | None = None
        self.foreign: dict[int, int] = {}  # pid -> most GPU memory seen, for other processes on this GPU
        self.samples = 0
        self.busy_s = 0.0  # time spent sampling (NVML calls and the Python around them)

    def sample(self) -> None:
        t0 = time.perf_counter()
        try:
            nv = self.nv
            dev = nv.nvmlDeviceGetMemoryInfo(self.handle).used
            self.peak_device_bytes = max(self.peak_device_bytes or 0, dev)
            mine = None
            for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    for p in getter(self.handle):
                        if p.pid == self.pid and p.usedGpuMemory is not None:
                            mine = (mine or 0) + p.usedGpuMemory
                        elif p.pid != self.pid and p.pid not in self.ignore_pids:  # another process shares the GPU
                            self.foreign[p.pid] = max(self.foreign.get(p.pid, 0), p.usedGpuMemory or 0)
                except nv.NVMLError:
                    pass
            if mine is not None:
                self.peak_process_bytes = max(self.peak_process_bytes or 0, mine)
            self.samples += 1
            if self.samples % TELEMETRY_EVERY == 0:
                self.telemetry.sample()
        finally:
            self.busy_s += time.perf_counter() - t0

    def result(self) -> dict[str, Any]:
        return {"peak_process_bytes": self.peak_process_bytes, "peak_device_bytes": self.peak_device_bytes,
                "foreign": {str(k): v for k, v in self.foreign.items()}, "samples": self.samples,
                "busy_s": self.busy_s, "at_peak_power": self.telemetry.at_peak_power,
                "throttle_seen": sorted(self.telemetry.throttle_seen)}


class GpuMemorySampler:
    """Samples NVML memory of process ``pid`` (default this one) and of the whole device, and the GPU's telemetry,
    from :func:`start` to :func:`stop`: in a monitor process, or in a thread where that cannot start.

    The run's own :class:`GpuTelemetry` (``telemetry``: the start snapshot, the energy counter around the timed
    steps, the end snapshot) stays in the training process; the sampling's peak-power reading and throttle
    reasons are merged into it at :func:`stop`.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.01, pid: int | None = None,
                 ignore_pids: tuple[int, ...] = ()):
        self.interval_s = interval_s
        self.pid = pid or os.getpid()
        self.ignore_pids = set(ignore_pids)  # the other ranks of a multi-GPU run: not someone else's load
        self.peak_process_bytes: int | None = None
        self.peak_device_bytes: int | None = None
        self.baseline_device_bytes: int | None = None
        self.samples = 0
        self.busy_s = 0.0
        self.sampling_s = 0.0  # time from start() to stop()
        self.foreign: dict[int, int] = {}
        self.mode: str | None = None  # "process" or "thread" once started
        self.mode_reason: str | None = None  # why the thread, when the process could not start
        self.telemetry: GpuTelemetry | None = None
        self.error: str | None = None
        self._index = nvml_index(device_index)
        self._handle = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._peaks: Peaks | None = None
        self._stop = threading.Event()
        self._started_at: float | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
            self.baseline_device_bytes = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.telemetry = GpuTelemetry(pynvml, self._handle)
            self.telemetry.begin()
        except Exception as e:  # no driver / no GPU: the fields stay None, and we say why
            self.error = f"{type(e).__name__}: {e}"
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    @property
    def busy_pct(self) -> float | None:
        """Percent of the sampled time the sampling was busy (its duty cycle; as a thread, an upper bound on how
        much of the training process's time it could take)."""
        return 100.0 * self.busy_s / self.sampling_s if self.sampling_s > 0 else None

    def readings(self) -> dict[str, Any]:
        """What the sampling found, in the run's metric names (GiB): the NVML peaks of the process and the device,
        the device's use before, other processes on the GPU, how and how busily it sampled, and its error."""
        return {"peak_vram_nvml_gib": _gib(self.peak_process_bytes),
                "peak_vram_device_gib": _gib(self.peak_device_bytes),
                "vram_device_before_gib": _gib(self.baseline_device_bytes), "nvml_samples": self.samples,
                "nvml_sampler_busy_pct": self.busy_pct, "nvml_sampler": self.mode,
                "nvml_sampler_note": self.mode_reason, "nvml_error": self.error,
                "foreign_gpu_processes": [{"pid": pid, "max_gib": _gib(b)} for pid, b in sorted(self.foreign.items())]}

    def start(self) -> GpuMemorySampler:
        if not self.available or self.mode is not None:
            return self
        self._started_at = time.perf_counter()
        try:
            self._start_process()
            self.mode = "process"
        except Exception as e:  # the monitor could not start: sample in a thread rather than not at all
            self._kill()
            self.mode, self.mode_reason = "thread", f"monitor process did not start: {type(e).__name__}: {e}"
            self._peaks = Peaks(self._nvml, self._handle, self.pid, self.ignore_pids)
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _start_process(self) -> None:
        cmd = [sys.executable, "-m", "harness.measuring.nvml_sampler", "--pid", str(self.pid), "--index",
               str(self._index), "--interval", repr(self.interval_s)]
        cmd += [a for p in sorted(self.ignore_pids) for a in ("--ignore", str(p))]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        ready, _, _ = select.select([self._proc.stdout], [], [], READY_TIMEOUT_S)
        line = self._proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            err = self._proc.stderr.read()[-300:] if self._proc.poll() is not None else "no answer"
            raise RuntimeError(line or err.strip() or f"exit code {self._proc.returncode}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._peaks.sample()
            except Exception as e:  # keep the run going; report the sampler's failure with the result
                self.error = f"{type(e).__name__}: {e}"
                return

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self.mode is None or self._started_at is None:
            return
        self.sampling_s = time.perf_counter() - self._started_at
        self._started_at = None
        if self._proc is not None:
            try:
                out, err = self._proc.communicate("stop\n", timeout=30)
                self._merge(json.loads(out.strip().splitlines()[-1]))
            except Exception as e:  # the monitor died or said nothing usable: the peaks are unknown, and why
                self._kill()
                self.error = f"NVML monitor process: {type(e).__name__}: {e}"
        else:
            self._stop.set()
            self._thread.join(timeout=5)
            try:
                self._peaks.sample()
            except Exception:
                pass
            self._merge(self._peaks.result())

    def _merge(self, r: dict[str, Any]) -> None:
        self.peak_process_bytes, self.peak_device_bytes = r["peak_process_bytes"], r["peak_device_bytes"]
        self.foreign = {int(k): v for k, v in r["foreign"].items()}
        self.samples, self.busy_s = r["samples"], r["busy_s"]
        self.error = self.error or r.get("error")
        tel = self.telemetry
        if tel is not None:
            tel.throttle_seen.update(r["throttle_seen"])
            peak = r["at_peak_power"]
            if peak and peak.get("power_w") is not None and (
                    tel.at_peak_power is None or peak["power_w"] > (tel.at_peak_power.get("power_w") or 0)):
                tel.at_peak_power = peak


def _gib(b: int | None) -> float | None:
    return None if b is None else b / 2**30


def main(argv: list[str] | None = None) -> int:
    """The monitor process: sample until told to stop or until the parent's pipe closes; print the result."""
    ap = argparse.ArgumentParser(prog="python -m harness.measuring.nvml_sampler")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--index", type=int, required=True, help="NVML device index")
    ap.add_argument("--interval", type=float, required=True, help="seconds between memory samples")
    ap.add_argument("--ignore", type=int, action="append", default=[], help="a pid not counted as foreign")
    a = ap.parse_args(argv)
    import pynvml

    pynvml.nvmlInit()
    peaks = Peaks(pynvml, pynvml.nvmlDeviceGetHandleByIndex(a.index), a.pid, set(a.ignore))
    peaks.sample()
    print("ready", flush=True)
    error = None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], a.interval)
        if ready:  # "stop", or end of input: the run is over (or its process is gone)
            break
        try:
            peaks.sample()
        except Exception as e:  # say why the peaks end here
            error = f"{type(e).__name__}: {e}"
            break
    if error is None:
        peaks.sample()  # the state at the end
    print(json.dumps(peaks.result() | {"error": error}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
