"""Runs in threads (matrix and frontier with --jobs) stop when the main thread is interrupted: each run's wait loop
sees runner.STOP, kills its worker and raises, so an interrupted call ends in seconds and stores nothing half-done."""

from __future__ import annotations

import threading
import time

import pytest

from harness.running import runner
from harness.spec.scenario import parse_scenario

SLOW = """\
version: 1
name: slow
model: {preset: tiny-llama, dtype: float32}
method: {kind: lora, lora_r: 4}
data: {seq_len: 16}
train: {micro_batch: 1, steps: 3, warmup_steps: 1}
hardware: {device: cpu}
measure: {timeout_s: 300, baseline: d-slow}
frameworks:
  - {name: dummy, label: d-slow, overrides: {sleep_s: 60}}
"""


def test_an_interrupt_of_the_main_thread_stops_the_runs_in_threads(tmp_path, env):
    sc = parse_scenario(SLOW)
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            runner.run_sweep(sc, tmp_path / "results", quiet=True)
        except BaseException as e:  # noqa: BLE001 - the thread's outcome is what the test reads
            errors.append(e)

    t = threading.Thread(target=sweep)
    with pytest.raises(KeyboardInterrupt), runner.stop_runs_on_interrupt():
        t.start()
        deadline = time.monotonic() + 120
        while not list((tmp_path / "work").glob("**/spec.json")) and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker has started
        time.sleep(2)
        raise KeyboardInterrupt
    t0 = time.monotonic()
    t.join(timeout=30)
    assert not t.is_alive() and time.monotonic() - t0 < 15  # not the 60 s the worker would sleep
    assert len(errors) == 1 and isinstance(errors[0], KeyboardInterrupt)
    assert not list((tmp_path / "results").glob("slow-*/runs/*.json"))  # nothing stored for the stopped run
    runner.STOP.clear()
