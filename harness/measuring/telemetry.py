"""GPU telemetry of a run: clocks, power, temperature, throttle reasons and the energy of the timed steps.

Throughput alone cannot tell a throttled or power-capped GPU from a slow framework, and teams pay for energy.
NVML's total-energy counter (millijoules since the driver loaded) is read at the begin and end of every
measured step, so the energy covers exactly the time the throughput is computed over; joules per token and
average watts follow from it. Clocks, power, temperature and throttle reasons are read at the start, at the
end, and at the moment of highest power draw in between (sampled from the memory sampler's thread).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# NVML's clocks-event (throttle) reason bits, as documented in nvml.h (nvmlClocksEventReason*). Named here so
# that pynvml's renames between versions (ClocksThrottle -> ClocksEvent) do not matter.
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the GPU ran below the clocks a healthy, unshared GPU of its kind runs at: thermal and hardware
# slowdowns, and an enforced power limit below the GPU's default (a capped box). The software power cap alone is
# not among them: a dense training load holds an H100/H200 at its (default) power limit, so it is seen in nearly
# every GPU run; it is recorded (``power_capped``) and shown, but it does not make a run "throttled".
SLOWING = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
                     "power_limit_below_default"})
POWER_CAP = "sw_power_cap"
NVML_CLOCK_SM = 1  # nvmlClockType_t: NVML_CLOCK_GRAPHICS 0, SM 1, MEM 2
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0


def throttle_flags(reasons: Iterable[str]) -> dict[str, bool]:
    """``throttled`` (a reason in :data:`SLOWING` was seen) and ``power_capped`` (the software power cap was)."""
    seen = set(reasons)
    return {"throttled": bool(seen & SLOWING), "power_capped": POWER_CAP in seen}


def throttle_names(mask: int) -> list[str]:
    """The named reasons set in an NVML clocks-event mask (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_BITS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_BITS)
    return names + ([hex(rest)] if rest else [])


class GpuTelemetry:
    """Reads one GPU's telemetry through an initialised ``pynvml`` module and a device handle."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml = nvml
        self.handle = handle
        self.start: dict[str, Any] | None = None
        self.at_peak_power: dict[str, Any] | None = None
        self.throttle_seen: set[str] = set()
        self.energy_j = 0.0
        self.energy_error: str | None = None
        self._step_mj: int | None = None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except Exception:  # a reading this driver or GPU does not offer stays None
            return None

    def _throttle_mask(self) -> int | None:
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            if hasattr(self.nvml, name):
                return self._call(name)
        return None

    def snapshot(self) -> dict[str, Any]:
        """Clocks (MHz), power draw and limit (W), temperature (C) and throttle reasons now."""
        power = self._call("nvmlDeviceGetPowerUsage")
        limit = self._call("nvmlDeviceGetEnforcedPowerLimit")
        default = self._call("nvmlDeviceGetPowerManagementDefaultLimit")
        mask = self._throttle_mask()
        reasons = throttle_names(mask) if mask is not None else None
        if limit is not None and default is not None and limit < default:
            reasons = [*(reasons or []), "power_limit_below_default"]
        if reasons:
            self.throttle_seen.update(reasons)
        return {
            "sm_clock_mhz": self._call("nvmlDeviceGetClockInfo", NVML_CLOCK_SM),
            "mem_clock_mhz": self._call("nvmlDeviceGetClockInfo", NVML_CLOCK_MEM),
            "power_w": power / 1000 if power is not None else None,
            "power_limit_w": limit / 1000 if limit is not None else None,
            "temperature_c": self._call("nvmlDeviceGetTemperature", NVML_TEMPERATURE_GPU),
            "throttle_reasons": reasons,
        }

    def begin(self) -> None:
        self.start = self.snapshot()

    def sample(self) -> None:
        """One reading during the run: keeps the snapshot of the highest power draw seen."""
        snap = self.snapshot()
        if snap["power_w"] is not None and (self.at_peak_power is None
                                            or snap["power_w"] > (self.at_peak_power["power_w"] or 0)):
            self.at_peak_power = snap

    def _energy_mj(self) -> int | None:
        return self._call("nvmlDeviceGetTotalEnergyConsumption")

    def step_begin(self) -> None:
        self._step_mj = self._energy_mj()

    def step_end(self) -> None:
        end = self._energy_mj()
        if self._step_mj is None or end is None:
            self.energy_error = "NVML total-energy counter not available on this GPU/driver"
            return
        self.energy_j += (end - self._step_mj) / 1000
        self._step_mj = None

    def summary(self, measured_s: float | None, tokens_measured: int | None) -> dict[str, Any]:
        """The run's telemetry metrics: energy over the timed steps, per token and as average watts."""
        end = self.snapshot()
        have_energy = self.energy_error is None and self.energy_j > 0
        return {
            "energy_j": self.energy_j if have_energy else None,
            "joules_per_token": self.energy_j / tokens_measured if have_energy and tokens_measured else None,
            "avg_power_w": self.energy_j / measured_s if have_energy and measured_s else None,
            "energy_error": self.energy_error,
            "telemetry": {"start": self.start, "peak_power": self.at_peak_power, "end": end},
            "throttle_reasons_seen": sorted(self.throttle_seen),
            **throttle_flags(self.throttle_seen),
        }
