"""scripts/gpu_steps.sh on a warm machine: a second call's clean copy gets the checkout's results it lacks, but not
a row that a step of the first call set aside (the frontier's `--redo-older` would set it aside again, as a second
copy of the same attempt)."""

import io
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_steps.sh"


def test_a_row_set_aside_on_the_machine_is_not_copied_back(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "out"
    probe = repo / "results" / "f-1" / "p-1"
    (probe / "runs").mkdir(parents=True)
    (probe / "logs").mkdir()
    (probe / "runs" / "tb-r0.json").write_text('{"sha": "old"}')
    (probe / "logs" / "tb-r0.log").write_text("old log")
    (repo / "results" / "g-1" / "runs").mkdir(parents=True)
    (repo / "results" / "g-1" / "runs" / "hf-r0.json").write_text('{"kept": true}')
    out.mkdir()
    name = f"t{uuid.uuid4().hex[:8]}"
    (repo / ".work").mkdir()
    with tarfile.open(repo / ".work" / f"{name}.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("README.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"x\n"))
    (repo / ".work" / f"{name}.sha").write_text("0" * 40 + "\n")
    aside = ("mkdir -p results/f-1/p-1/runs/attempts results/f-1/p-1/logs/attempts && "
             "mv results/f-1/p-1/runs/tb-r0.json results/f-1/p-1/runs/attempts/tb-r0.1.json && "
             "mv results/f-1/p-1/logs/tb-r0.log results/f-1/p-1/logs/attempts/tb-r0.1.log")
    (repo / ".work" / "s1.txt").write_text(aside + "\n")
    (repo / ".work" / "s2.txt").write_text("find results -type f | sort > $OUT/files.txt\n")
    env = {**os.environ, "OUT": str(out), "B": "120"}
    clean = Path(f"/tmp/clean-{name}")
    try:
        for steps in ("s1.txt", "s2.txt"):
            done = subprocess.run(["bash", str(SCRIPT), name, f".work/{steps}"], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        files = (out / "files.txt").read_text().split()
    finally:
        shutil.rmtree(clean, ignore_errors=True)
    assert files == ["results/f-1/p-1/logs/attempts/tb-r0.1.log", "results/f-1/p-1/runs/attempts/tb-r0.1.json",
                     "results/g-1/runs/hf-r0.json"]
