"""GPU telemetry from NVML readings: energy over the measured steps only, throttling named and flagged."""

from __future__ import annotations

import pytest

from harness.measuring.meter import StepMeter
from harness.measuring.telemetry import GpuTelemetry, throttle_names
from harness.storing.schema import Metrics


class FakeNvml:
    """NVML's readings as a GPU under load would give them: energy grows 500 J per second of wall time."""

    def __init__(self):
        self.energy_mj = 1_000_000
        self.power_mw = 400_000
        self.mask = 0x1
        self.limit_mw = 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):  # noqa: N802 (NVML's names)
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h):  # noqa: N802
        return self.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):  # noqa: N802
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


def _measure(nv: FakeNvml, last_step_mask: int) -> dict:
    """Three steps (one warmup) on a fake GPU; the last step's telemetry sample sees ``last_step_mask``."""
    meter = StepMeter(warmup_steps=1, device="cpu")
    meter._telemetry = tel = GpuTelemetry(nv, handle=None)
    tel.begin()
    for i, joules in enumerate([999.0, 100.0, 300.0]):  # the warmup step's 999 J must not count
        meter.count_batch({"input_ids": [[1] * 10]})
        meter.step_begin()
        nv.energy_mj += int(joules * 1000)
        if i == 2:
            nv.mask, nv.power_mw = last_step_mask, 690_000
            tel.sample()
        meter.step_end(loss=1.0 - i / 10)
    return meter.finish()


def test_energy_counts_measured_steps_only_and_the_power_cap_is_not_throttling():
    m = _measure(FakeNvml(), 0x4)  # at its default power limit during the last step: what a loaded H200 reports
    assert m["energy_j"] == pytest.approx(400.0)
    assert m["joules_per_token"] == pytest.approx(400.0 / 20)
    assert m["avg_power_w"] == pytest.approx(400.0 / m["measured_s"])
    assert m["throttle_reasons_seen"] == ["gpu_idle", "sw_power_cap"]
    assert m["power_capped"] is True and m["throttled"] is False
    assert m["telemetry"]["peak_power"]["power_w"] == 690.0
    assert m["telemetry"]["start"]["sm_clock_mhz"] == 1980


@pytest.mark.parametrize("mask, limit_mw, reason", [
    (0x40, 700_000, "hw_thermal_slowdown"), (0x8, 700_000, "hw_slowdown"),
    (0x4, 500_000, "power_limit_below_default"),  # an administrator's lower cap: slower than the GPU's kind
])
def test_thermal_hardware_and_lowered_power_limit_are_throttling(mask, limit_mw, reason):
    nv = FakeNvml()
    nv.limit_mw = limit_mw
    m = _measure(nv, mask)
    assert m["throttled"] is True and reason in m["throttle_reasons_seen"]


def test_stored_flags_are_rederived_from_the_recorded_reasons():
    # a run stored when the power cap still counted as throttling reads by the current rule
    old = Metrics.model_validate({"throttled": True, "throttle_reasons_seen": ["gpu_idle", "sw_power_cap"]})
    assert old.throttled is False and old.power_capped is True
    hot = Metrics.model_validate({"throttled": False, "throttle_reasons_seen": ["sw_thermal_slowdown"]})
    assert hot.throttled is True and hot.power_capped is False


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
