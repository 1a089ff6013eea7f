"""The history database: one row per stored run of every sweep, in an embedded DuckDB file.

The per-run JSON files (``results/<sweep>/runs/*.json``) stay the source of truth; the database is derived data
that :func:`rebuild` recreates from them at any time (through :func:`harness.storing.sweep.load_sweep`, which
migrates older result versions). It lives beside the results it indexes, in ``<results>/.cache/history.duckdb``
(``.cache/`` is ignored by git). Why DuckDB over SQLite: see docs/nightly.md.

Example::

    db = default_db(Path("results"))
    rebuild(db, Path("results"))
    rows = query(db, scenario="tiny_cpu", since="2026-11-01")
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from harness.storing.schema import RunResult
from harness.storing.sweep import Sweep, is_results_dir, load_sweep

DB_NAME = "history.duckdb"
# column -> DuckDB type; the order is the table's and every export's
COLUMNS: dict[str, str] = {
    "sweep_id": "VARCHAR", "created": "TIMESTAMP", "scenario": "VARCHAR", "settings_hash": "VARCHAR",
    "framework": "VARCHAR", "repeat": "INTEGER", "status": "VARCHAR", "valid": "BOOLEAN", "device": "VARCHAR",
    "steps_measured": "INTEGER", "tokens_per_s": "DOUBLE", "peak_vram_nvml_gib": "DOUBLE",
    "peak_reserved_gib": "DOUBLE", "final_loss": "DOUBLE", "joules_per_token": "DOUBLE",
    "framework_version": "VARCHAR", "git_sha": "VARCHAR", "libraries": "VARCHAR", "gpu_name": "VARCHAR",
    "driver": "VARCHAR", "sm_clock_mhz": "DOUBLE", "mem_clock_mhz": "DOUBLE", "dataset_sha256_16": "VARCHAR",
    "loss_rule": "VARCHAR",
}
KEY = ("sweep_id", "framework", "repeat")  # a run's identity: appending a sweep again replaces its rows
_CREATED = re.compile(r"(\d{8}-\d{6})$")


def default_db(results_root: Path) -> Path:
    """Where the history of ``results_root`` is kept: ``<results_root>/.cache/history.duckdb``."""
    return Path(results_root) / ".cache" / DB_NAME


def db_problem(db: Path) -> str | None:
    """Why ``db`` cannot be the history database, or None: a directory, a file that is not a DuckDB database
    (:func:`rebuild` deletes and recreates the file: never one that is not ours), or a path below a file."""
    db = Path(db)
    try:
        if db.is_dir():
            return "a directory, not a database file"
        if db.exists():
            if not db.is_file():
                return "not a regular file"
            with open(db, "rb") as f:
                head = f.read(12)
            return None if head[8:12] == b"DUCK" else "exists and is not a DuckDB database (left as it is)"
        parent = db.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return None if parent.is_dir() else f"{parent} is not a directory"
    except OSError as e:
        return e.strerror or str(e)


def connect(db: Path) -> duckdb.DuckDBPyConnection:
    """Open (creating when missing) the database with its ``runs`` table."""
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db))
    cols = ", ".join(f'"{c}" {t}' for c, t in COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols}, PRIMARY KEY ({', '.join(KEY)}))")
    have = {row[0] for row in con.execute("DESCRIBE runs").fetchall()}
    for c, t in COLUMNS.items():  # a database made by an older harness: the columns added since, empty for its rows
        if c not in have:
            con.execute(f'ALTER TABLE runs ADD COLUMN "{c}" {t}')
    return con


def sweep_created(sweep: Sweep) -> datetime:
    """When a sweep started: its plan's ``created`` (``YYYYmmdd-HHMMSS``), else the id's suffix, else the
    earliest run start, else the directory's modification time (all UTC)."""
    for text in (str(sweep.plan.get("created") or ""), sweep.path.name):
        if m := _CREATED.search(text):
            return datetime.strptime(m.group(1), "%Y%m%d-%H%M%S")
    starts = [r.started_at for r in sweep.runs if r.started_at]
    ts = min(starts) if starts else sweep.path.stat().st_mtime
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def run_row(sweep: Sweep, run: RunResult, created: datetime) -> dict[str, Any]:
    """One run as a history row (:data:`COLUMNS`); the run's own environment first, else the sweep's."""
    env = run.environment or sweep.environment
    m = run.metrics
    telemetry = m.telemetry.get("start") if isinstance(m.telemetry, dict) else None
    telemetry = telemetry if isinstance(telemetry, dict) else {}
    libraries = {k: v for k, v in sorted((env.libraries or {}).items()) if v}
    return {
        "sweep_id": sweep.path.name, "created": created, "scenario": run.scenario, "settings_hash": run.settings_hash,
        "framework": run.framework, "repeat": run.repeat, "status": run.status, "valid": run.valid,
        "device": run.device, "steps_measured": m.steps_measured, "tokens_per_s": m.tokens_per_s,
        "peak_vram_nvml_gib": m.peak_vram_nvml_gib, "peak_reserved_gib": m.peak_reserved_gib,
        "final_loss": m.final_loss, "joules_per_token": m.joules_per_token,
        "framework_version": run.framework_version, "git_sha": env.git_sha,
        "libraries": json.dumps(libraries, sort_keys=True), "gpu_name": env.gpu_name, "driver": env.driver,
        "sm_clock_mhz": telemetry.get("sm_clock_mhz"), "mem_clock_mhz": telemetry.get("mem_clock_mhz"),
        "dataset_sha256_16": run.dataset_sha256_16,
        # which tokens of conversation rows bore loss (harness.inputs.data.LOSS_RULE); None for other rows
        "loss_rule": None if (rule := (run.dataset or {}).get("loss_rule")) is None else str(rule),
    }


def sweep_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """Every readable stored run of a sweep as history rows."""
    created = sweep_created(sweep)
    return [run_row(sweep, r, created) for r in sweep.runs]


def append(db: Path, sweep_dir: Path) -> int:
    """Add (or replace) one sweep's runs in the history; returns how many rows it holds now.

    Raises:
        harness.storing.sweep.NotAResultsDir: ``sweep_dir`` is not a sweep.
    """
    rows = sweep_rows(load_sweep(sweep_dir))
    with connect(db) as con:
        _insert(con, rows)
    return len(rows)


def _insert(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(COLUMNS)
    names = ", ".join(f'"{c}"' for c in cols)
    con.executemany(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({', '.join('?' * len(cols))})",
                    [[r[c] for c in cols] for r in rows])


def rebuild(db: Path, results_root: Path) -> tuple[int, list[str]]:
    """Recreate the database from every ``<results_root>/*/runs/*.json``.

    Returns:
        (rows written, the unreadable stored files named with why).
    """
    db = Path(db)
    for stale in (db, db.with_name(db.name + ".wal")):
        stale.unlink(missing_ok=True)
    skipped: list[str] = []
    total = 0
    with connect(db) as con:
        for d in sorted(Path(results_root).iterdir()):
            if not is_results_dir(d):
                continue
            sweep = load_sweep(d)
            skipped += [str(u) for u in sweep.unreadable if u.path.parent.name == "runs"]
            rows = sweep_rows(sweep)
            _insert(con, rows)
            total += len(rows)
    return total, skipped


def _where(scenario: str | None, framework: str | None, since: str | datetime | None) -> tuple[str, list]:
    clauses, params = [], []
    for col, val in (("scenario", scenario), ("framework", framework)):
        if val:
            clauses.append(f"{col} = ?")
            params.append(val)
    if since:
        clauses.append("created >= CAST(? AS TIMESTAMP)")
        params.append(str(since))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query(db: Path, scenario: str | None = None, framework: str | None = None,
          since: str | datetime | None = None) -> list[dict[str, Any]]:
    """The stored rows, oldest first, filtered by scenario, framework and earliest creation time.

    Args:
        db: the database file.
        scenario, framework: exact names; None: all.
        since: ``YYYY-MM-DD`` (or a full timestamp); None: all time.
    """
    where, params = _where(scenario, framework, since)
    with connect(db) as con:
        cur = con.execute(f"SELECT * FROM runs{where} ORDER BY created, sweep_id, framework, repeat", params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def export(db: Path, out: Path, fmt: str, scenario: str | None = None, framework: str | None = None,
           since: str | datetime | None = None) -> Path:
    """Write the (filtered) rows to ``out`` as ``csv`` or ``parquet`` with DuckDB's own writers."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"export format {fmt!r}: csv or parquet")
    where, params = _where(scenario, framework, since)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = "FORMAT csv, HEADER true" if fmt == "csv" else "FORMAT parquet"
    path_sql = str(out.resolve()).replace("'", "''")
    with connect(db) as con:
        con.execute(f"COPY (SELECT * FROM runs{where} ORDER BY created, sweep_id, framework, repeat) "
                    f"TO '{path_sql}' ({options})", params)
    return out
