"""Runs set aside for a retry (``run --retry-failed``) and the pruning of large outputs after a run."""

from __future__ import annotations

import json

from harness.running import runner


def _row(d, key, status):  # noqa: ANN001
    (d / "runs").mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    (d / "runs" / f"{key}.json").write_text(json.dumps({"status": status, "reason": f"{key} {status}"}))
    (d / "logs" / f"{key}.log").write_text(f"log of {key}")


def test_failed_rows_are_set_aside_and_listed(tmp_path):  # noqa: ANN001
    _row(tmp_path, "hf-r0", "ok")
    _row(tmp_path, "hf-r1", "oom")
    _row(tmp_path, "tb-r0", "error")
    _row(tmp_path, "tb-r1", "timeout")
    moved = runner.set_aside_failed(tmp_path, ["hf-r0", "hf-r1", "tb-r0", "tb-r1", "missing-r0"])
    assert moved == ["tb-r0", "tb-r1"]  # an OOM is the framework's result: kept where it is
    assert (tmp_path / "runs" / "hf-r1.json").exists() and (tmp_path / "runs" / "hf-r0.json").exists()
    assert not (tmp_path / "runs" / "tb-r0.json").exists()
    assert (tmp_path / "logs" / "attempts" / "tb-r0.1.log").read_text() == "log of tb-r0"
    # a second failure of the same run is a second attempt, never written over the first
    _row(tmp_path, "tb-r0", "crashed")
    runner.set_aside_failed(tmp_path, ["tb-r0"])
    assert runner.previous_attempts(tmp_path, "tb-r0") == [
        {"file": "runs/attempts/tb-r0.1.json", "status": "error", "reason": "tb-r0 error"},
        {"file": "runs/attempts/tb-r0.2.json", "status": "crashed", "reason": "tb-r0 crashed"},
    ]
    assert runner.previous_attempts(tmp_path, "hf-r0") == []


def test_prune_outputs_keeps_small_files(tmp_path, monkeypatch):  # noqa: ANN001
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "lit_model.pth").write_bytes(b"x" * 2048)
    (tmp_path / "final" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    monkeypatch.setenv("TUNEBENCH_KEEP_OUTPUTS", "1")
    assert runner.prune_outputs(tmp_path, limit_bytes=1024) == []
    monkeypatch.delenv("TUNEBENCH_KEEP_OUTPUTS")
    assert runner.prune_outputs(tmp_path, limit_bytes=1024) == ["final/lit_model.pth"]
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
