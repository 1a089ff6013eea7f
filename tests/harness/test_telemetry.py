"""GPU telemetry from NVML readings: energy over the measured steps only, throttling named and flagged."""

from __future__ import annotations

import pytest

from harness.measuring.meter import StepMeter
from harness.measuring.telemetry import GpuTelemetry, throttle_names
from harness.running.worker import run_warnings


class FakeNvml:
    """NVML's readings as a GPU under load would give them: energy grows 500 J per second of wall time."""

    def __init__(self):
        self.energy_mj = 1_000_000
        self.power_mw = 400_000
        self.mask = 0x1

    def nvmlDeviceGetTotalEnergyConsumption(self, h):  # noqa: N802 (NVML's names)
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h):  # noqa: N802
        return 700_000

    def nvmlDeviceGetClockInfo(self, h, kind):  # noqa: N802
        return {1: 1980, 2: 3201}[kind]

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        return 55

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):  # noqa: N802
        return self.mask


def test_throttle_bits_named():
    assert throttle_names(0x1 | 0x4 | 0x40) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_names(0x10000) == ["0x10000"]


def test_energy_counts_measured_steps_only_and_throttling_is_flagged():
    nv = FakeNvml()
    meter = StepMeter(warmup_steps=1, device="cpu")
    meter._telemetry = tel = GpuTelemetry(nv, handle=None)
    tel.begin()
    for i, joules in enumerate([999.0, 100.0, 300.0]):  # the warmup step's 999 J must not count
        meter.count_batch({"input_ids": [[1] * 10]})
        meter.step_begin()
        nv.energy_mj += int(joules * 1000)
        if i == 2:
            nv.mask, nv.power_mw = 0x4, 690_000  # power capped during the last step
            tel.sample()
        meter.step_end(loss=1.0 - i / 10)
    m = meter.finish()
    assert m["energy_j"] == pytest.approx(400.0)
    assert m["joules_per_token"] == pytest.approx(400.0 / 20)
    assert m["avg_power_w"] == pytest.approx(400.0 / m["measured_s"])
    assert m["throttled"] is True and m["throttle_reasons_seen"] == ["gpu_idle", "sw_power_cap"]
    assert m["telemetry"]["peak_power"]["power_w"] == 690.0
    assert m["telemetry"]["start"]["sm_clock_mhz"] == 1980
    assert any("throttled" in w and "sw_power_cap" in w for w in run_warnings(m))


def test_missing_energy_counter_says_so():
    class NoEnergyCounter(FakeNvml):
        def nvmlDeviceGetTotalEnergyConsumption(self, h):  # noqa: N802
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    tel = GpuTelemetry(NoEnergyCounter(), handle=None)
    tel.step_begin()
    tel.step_end()
    s = tel.summary(1.0, 10)
    assert s["energy_j"] is None and "not available" in s["energy_error"]


def test_cpu_run_has_no_telemetry():
    meter = StepMeter(warmup_steps=0, device="cpu")
    meter.step_begin()
    meter.step_end(loss=1.0)
    m = meter.finish()
    assert m["energy_j"] is None and m["throttled"] is None
