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


def test_a_matrix_rows_retried_row_and_derived_tables_come_in(tmp_path):
    """A matrix folder holds one sweep per row: a row redone there (``--retry-invalid``) replaces the attempt stored
    here as in a top-level sweep; the matrix's derived tables are the call's."""
    top_here, top_dev = tmp_path / "here" / "results" / "m-1", tmp_path / "dev" / "results" / "m-1"
    here, dev = top_here / "matrix.x.lora-1", top_dev / "matrix.x.lora-1"
    write(here / "runs" / "u-r0.json", '{"invalid": true}')
    write(here / "logs" / "u-r0.log", "old log")
    write(top_here / "matrix.csv", "old cells")
    write(top_here / "not_run.json", '{"old": {}}')
    write(dev / "runs" / "attempts" / "u-r0.1.json", '{"invalid": true}')
    write(dev / "runs" / "u-r0.json", '{"invalid": false}')
    write(dev / "logs" / "u-r0.log", "new log")
    write(top_dev / "matrix.csv", "new cells")
    write(top_dev / "not_run.json", '{"new": {}}')

    out = unpack(tmp_path, tmp_path / "dev")

    assert out.returncode == 0, out.stderr
    assert (here / "runs" / "u-r0.json").read_text() == '{"invalid": false}'
    assert (here / "runs" / "attempts" / "u-r0.1.json").read_text() == '{"invalid": true}'
    assert (here / "logs" / "u-r0.log").read_text() == "new log"
    assert (here / "logs" / "attempts" / "u-r0.1.log").read_text() == "old log"
    assert (top_here / "matrix.csv").read_text() == "new cells"
    assert (top_here / "not_run.json").read_text() == '{"new": {}}'


def test_the_plan_gains_the_rows_the_call_added(tmp_path):
    """`run --resume --only ...` on the machine added rows to the sweep's plan: the plan here gains them (and keeps
    its own, in its order); a call whose plan adds nothing leaves the file as it is."""
    import json

    here, dev = tmp_path / "here" / "results" / "s-1", tmp_path / "dev" / "results" / "s-1"
    write(here / "sweep.json", json.dumps({"scenario": "s", "planned": ["hf-r0", "mine-r0"]}))
    write(dev / "sweep.json", json.dumps({"scenario": "s", "planned": ["hf-r0", "tb-r0", "trl-r0"]}))

    assert unpack(tmp_path, tmp_path / "dev").returncode == 0
    assert json.loads((here / "sweep.json").read_text()) == {"scenario": "s",
                                                             "planned": ["hf-r0", "mine-r0", "tb-r0", "trl-r0"]}
    before = (here / "sweep.json").read_text()
    assert unpack(tmp_path, tmp_path / "dev").returncode == 0
    assert (here / "sweep.json").read_text() == before


def test_a_new_sweep_comes_in_whole_and_a_retried_row_without_a_log(tmp_path):
    """A sweep that only the call has (its plan with it), beside a retried row whose new log did not come back."""
    here, dev = tmp_path / "here" / "results" / "s-1", tmp_path / "dev" / "results"
    write(here / "runs" / "a-r0.json", '{"status": "error"}')
    write(dev / "s-1" / "runs" / "attempts" / "a-r0.1.json", '{"status": "error"}')
    write(dev / "s-1" / "runs" / "a-r0.json", '{"status": "ok"}')
    write(dev / "new-1" / "sweep.json", '{"planned": ["hf-r0"]}')
    write(dev / "new-1" / "runs" / "hf-r0.json", '{"status": "ok"}')

    out = unpack(tmp_path, tmp_path / "dev")

    assert out.returncode == 0, out.stderr
    assert (here / "runs" / "a-r0.json").read_text() == '{"status": "ok"}'
    new = tmp_path / "here" / "results" / "new-1"
    assert (new / "sweep.json").read_text() == '{"planned": ["hf-r0"]}'
    assert (new / "runs" / "hf-r0.json").read_text() == '{"status": "ok"}'
    assert out.stdout.split() == ["results/new-1", "results/s-1"]


def test_a_probe_set_aside_without_a_new_row_moves_aside_here_once(tmp_path):
    """`frontier --redo-older` set a probe's row aside and searched elsewhere: the row stored here moves under
    runs/attempts/ as it did there, and the same attempt brought back again under other numbers (three calls that
    each set the re-copied row aside) is stored once."""
    here, dev = tmp_path / "here" / "results" / "f-1" / "p-1", tmp_path / "dev" / "results" / "f-1" / "p-1"
    write(here / "runs" / "tb-r0.json", '{"sha": "old"}')
    write(here / "logs" / "tb-r0.log", "old log")
    write(here / "runs.csv", "table")
    for n in (1, 2, 3):
        write(dev / "runs" / "attempts" / f"tb-r0.{n}.json", '{"sha": "old"}')
        write(dev / "logs" / "attempts" / f"tb-r0.{n}.log", "old log")
    write(dev / "runs.csv", "table")

    out = unpack(tmp_path, tmp_path / "dev")

    assert out.returncode == 0, out.stderr
    assert not (here / "runs" / "tb-r0.json").exists()
    assert not (here / "logs" / "tb-r0.log").exists()
    assert sorted(p.name for p in (here / "runs" / "attempts").iterdir()) == ["tb-r0.1.json"]
    assert (here / "runs" / "attempts" / "tb-r0.1.json").read_text() == '{"sha": "old"}'
    assert sorted(p.name for p in (here / "logs" / "attempts").iterdir()) == ["tb-r0.1.log"]
    before = {p: p.read_text() for p in here.rglob("*") if p.is_file()}
    assert unpack(tmp_path, tmp_path / "dev").returncode == 0
    assert {p: p.read_text() for p in here.rglob("*") if p.is_file()} == before
