"""scripts/gpu_unpack.sh: a device call's results come into the checkout without replacing what is stored, except a
row that the call's `run --retry-failed` redid (the stored row is byte for byte the attempt it set aside)."""

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_unpack.sh"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def unpack(tmp_path: Path, device: Path) -> subprocess.CompletedProcess:
    res = tmp_path / "res.tgz"
    with tarfile.open(res, "w:gz") as tar:
        tar.add(device / "results", arcname="results")
    return subprocess.run(["bash", str(SCRIPT), str(res)], cwd=tmp_path / "here", capture_output=True, text=True)


def test_retried_row_replaces_its_attempt_and_nothing_else(tmp_path):
    here, dev = tmp_path / "here" / "results" / "s-1", tmp_path / "dev" / "results" / "s-1"
    write(here / "runs" / "a-r0.json", '{"eval": "error"}')
    write(here / "logs" / "a-r0.log", "old log a")
    write(here / "runs" / "b-r0.json", '{"eval": "ok", "here": true}')
    write(here / "runs.csv", "old table")
    # the machine set a-r0 aside and ran it again; its b-r0 differs from ours (ours is kept)
    write(dev / "runs" / "attempts" / "a-r0.1.json", '{"eval": "error"}')
    write(dev / "runs" / "a-r0.json", '{"eval": "ok"}')
    write(dev / "logs" / "a-r0.log", "new log a")
    write(dev / "runs" / "b-r0.json", '{"eval": "ok", "here": false}')
    write(dev / "runs" / "c-r0.json", '{"new": true}')
    write(dev / "runs.csv", "new table")

    out = unpack(tmp_path, tmp_path / "dev")

    assert out.returncode == 0, out.stderr
    assert (here / "runs" / "a-r0.json").read_text() == '{"eval": "ok"}'
    assert (here / "runs" / "attempts" / "a-r0.1.json").read_text() == '{"eval": "error"}'
    assert (here / "logs" / "a-r0.log").read_text() == "new log a"
    assert (here / "logs" / "attempts" / "a-r0.1.log").read_text() == "old log a"
    assert (here / "runs" / "b-r0.json").read_text() == '{"eval": "ok", "here": true}'
    assert (here / "runs" / "c-r0.json").read_text() == '{"new": true}'
    assert (here / "runs.csv").read_text() == "new table"
    # a second unpack of the same file changes nothing
    before = {p: p.read_text() for p in here.rglob("*") if p.is_file()}
    assert unpack(tmp_path, tmp_path / "dev").returncode == 0
    assert {p: p.read_text() for p in here.rglob("*") if p.is_file()} == before


def test_attempt_that_is_not_the_stored_row_replaces_nothing(tmp_path):
    here, dev = tmp_path / "here" / "results" / "s-1", tmp_path / "dev" / "results" / "s-1"
    write(here / "runs" / "a-r0.json", '{"stored": "elsewhere"}')
    write(dev / "runs" / "attempts" / "a-r0.1.json", '{"eval": "error"}')
    write(dev / "runs" / "a-r0.json", '{"eval": "ok"}')

    assert unpack(tmp_path, tmp_path / "dev").returncode == 0
    assert (here / "runs" / "a-r0.json").read_text() == '{"stored": "elsewhere"}'
