"""The report's tables, as header + rows of text cells (numbers from harness.analysis.aggregate).

- :func:`summary_frame`: one row per framework, the figures of the comparison table and the charts;
- :func:`comparison_rows`, :func:`run_rows`, :func:`failure_rows`: speed, memory and failures;
- :func:`effective_table`: what each framework really ran with, against the scenario;
- :func:`how_run_rows`: each tool's native config, rerun command and adapter notes;
- :func:`scenario_rows`, :func:`environment_rows`, :func:`framework_env_rows`, :func:`foreign_processes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.analysis.aggregate import is_empty, summarise
from harness.measuring.effective import OPTIMIZER_NAMES, same_setting
from harness.reporting.document import EMPTY, Cell, fmt, short
from harness.storing.schema import Environment
from harness.storing.sweep import Sweep

# summary_frame column <- RunResult.metrics name
_FIGURES = {"tps_median": "tokens_per_s", "step_s_median": "step_s_median", "nvml_gib": "peak_vram_nvml_gib",
            "device_gib": "peak_vram_device_gib", "alloc_gib": "peak_alloc_gib", "reserved_gib": "peak_reserved_gib",
            "rss_gib": "peak_rss_gib", "mfu": "mfu", "model_tflops": "model_tflops", "final_loss": "final_loss",
            "joules_per_token": "joules_per_token", "avg_power_w": "avg_power_w"}


def summary_frame(sweep: Sweep):
    """One row per framework (scenario order), over its ok repeats; failed frameworks keep a row with reasons.

    Returns:
        DataFrame indexed by framework, figures per harness.analysis.aggregate (MLPerf-trimmed medians):
        ``tps_median`` with ``tps_min``/``tps_max`` (the range of the repeats kept) and pooled per-step
        ``tps_p10_step``/``tps_p90_step``, ``speedup`` against the baseline, the runs' memory peaks
        (``memory_ratio``: NVML peak against the baseline's), MFU, model TFLOP/s, final loss, energy per token
        and average power (GPU runs with NVML's energy counter), ``n_ok``/``n_total``, ``valid``,
        ``invalid_reasons``, ``failures``, ``throttled`` (the ok runs a throttled GPU measured, with the reasons).
    """
    import pandas as pd  # heavy optional dependency: the report's tables and charts are pandas frames

    rows = []
    for fw in sweep.framework_order():
        s = summarise(fw, sweep.runs_of(fw))
        tps = s.metrics["tokens_per_s"]
        row: dict[str, Any] = {col: s.median(metric) for col, metric in _FIGURES.items()}
        row |= {"tps_min": tps.low, "tps_max": tps.high, "tps_p10_step": s.step_p10, "tps_p90_step": s.step_p90,
                "n_ok": len(s.ok_runs), "n_total": len(s.runs), "valid": s.valid,
                "invalid_reasons": "; ".join(s.invalid_reasons),
                "failures": "; ".join(f"r{r.repeat} {r.status}: {short(r.reason, 200)}" for r in s.failed_runs),
                "throttled": "; ".join(f"r{r.repeat} ({', '.join(r.metrics.throttle_reasons_seen or []) or '?'})"
                                       for r in s.ok_runs if r.metrics.throttled)}
        rows.append(row)
    num = list(_FIGURES) + ["tps_min", "tps_max", "tps_p10_step", "tps_p90_step"]
    out = pd.DataFrame(rows, index=pd.Index(sweep.framework_order(), name="framework"),
                       columns=num + ["n_ok", "n_total", "valid", "invalid_reasons", "failures", "throttled"])
    out[num] = out[num].astype(float)  # None -> NaN: "does not apply" renders as "—"
    out["valid"] = out["valid"].astype(object)
    base = sweep.baseline
    base_tps = out.at[base, "tps_median"] if base in out.index else None
    out["speedup"] = out["tps_median"] / base_tps if not is_empty(base_tps) and base_tps else float("nan")
    base_mem = out.at[base, "nvml_gib"] if base in out.index else None
    out["memory_ratio"] = out["nvml_gib"] / base_mem if not is_empty(base_mem) and base_mem else float("nan")
    return out


def has_energy(summary) -> bool:
    """Whether any framework has an energy figure (GPU runs with NVML's energy counter): the comparison table then
    shows J/token and average power."""
    return bool(summary[["joules_per_token", "avg_power_w"]].notna().any().any())


def comparison_rows(summary, baseline: str, energy: bool = False) -> list[list[str | Cell]]:
    """Rows of the comparison table (header in harness.reporting.report), one per framework.

    Args:
        summary: :func:`summary_frame`.
        baseline: the baseline framework (bold, speed-up 1.00x).
        energy: add the J/token and average-power cells after MFU (:func:`has_energy`).
    """
    rows = []
    for fw, r in summary.iterrows():
        n_ok, n_total = int(r["n_ok"]), int(r["n_total"])
        if n_total == 0:
            status = Cell("no stored run", "bad")
        elif n_ok == n_total:
            status = Cell(f"ok, throttled: {r['throttled']}", "warn") if r["throttled"] else Cell("ok", "good")
        elif n_ok == 0:
            status = Cell(short(r["failures"], 250), "bad")
        else:
            status = Cell(f"partly failed: {short(r['failures'], 250)}", "bad")
        spread = (EMPTY if is_empty(r["tps_min"])
                  else f"{fmt(r['tps_min'], thousands=True)}–{fmt(r['tps_max'], thousands=True)}")
        steps = (EMPTY if is_empty(r["tps_p10_step"])
                 else f"{fmt(r['tps_p10_step'], thousands=True)}–{fmt(r['tps_p90_step'], thousands=True)}")
        speed = EMPTY if is_empty(r["speedup"]) else f"{r['speedup']:.2f}x"
        if fw == baseline and not is_empty(r["speedup"]):
            speed = "1.00x (baseline)"
        torch_mem = (EMPTY if is_empty(r["alloc_gib"]) and is_empty(r["reserved_gib"])
                     else f"{fmt(r['alloc_gib'])} / {fmt(r['reserved_gib'])}")
        if is_empty(r["valid"]):
            valid: str | Cell = EMPTY
        elif r["valid"]:
            valid = "yes"
        else:
            valid = Cell("INVALID: " + (short(r["invalid_reasons"], 250) or "see failures"), "bad")
        cells = [f"**{fw}**" if fw == baseline else fw, status, f"{n_ok}/{n_total}",
                 fmt(r["tps_median"], thousands=True), spread, steps, speed, fmt(r["nvml_gib"]),
                 EMPTY if is_empty(r["memory_ratio"]) else f"{100 * r['memory_ratio']:.1f} %",
                 fmt(r["device_gib"]), torch_mem, fmt(r["mfu"], 1, pct=True)]
        if energy:
            cells += [fmt(r["joules_per_token"], 4), fmt(r["avg_power_w"], 0)]
        rows.append(cells + [fmt(r["final_loss"], 4), valid])
    return rows


def run_rows(sweep: Sweep) -> list[list[str | Cell]]:
    """One row per stored run: its own figures, status, validity and reason."""
    rows = []
    for r in sweep.runs:
        m = r.metrics
        status = Cell(str(r.status), "good" if r.ok else "bad")
        valid = EMPTY if not r.ok else ("yes" if r.valid else Cell("INVALID", "bad"))
        note = "" if r.ok else short(r.reason, 200)
        if r.ok and r.invalid_reasons:
            note = short("; ".join(r.invalid_reasons), 200)
        rows.append([r.framework, fmt(r.repeat, 0), status, valid, fmt(m.tokens_per_s, thousands=True),
                     fmt(m.step_s_median, 4), fmt(m.peak_vram_nvml_gib), fmt(m.peak_reserved_gib),
                     fmt(m.peak_rss_gib), fmt(m.final_loss, 4), fmt(r.wall_s, 1), Cell(note, "bad") if note else EMPTY])
    return rows


def _three(readings: list[dict[str, Any]], key: str) -> str:
    return " / ".join(fmt(x.get(key), 0) for x in readings)


TELEMETRY_HEADER = ["framework", "repeat", "SM clock MHz (start / at peak power / end)",
                    "power W (start / peak / end)", "power limit W", "temperature °C (start / peak / end)",
                    "throttle reasons seen", "energy J", "J/token", "avg power W"]


def telemetry_rows(sweep: Sweep) -> list[list[str | Cell]]:
    """One row per run that recorded GPU telemetry or energy (:mod:`harness.measuring.telemetry`); [] if none."""
    rows = []
    for r in sweep.runs:
        m = r.metrics
        tel = m.telemetry if isinstance(m.telemetry, dict) else {}
        readings = [tel.get(when) if isinstance(tel.get(when), dict) else {} for when in ("start", "peak_power", "end")]
        if not any(readings) and m.energy_j is None and m.throttled is None:
            continue
        limit = next((x.get("power_limit_w") for x in readings if x.get("power_limit_w") is not None), None)
        reasons = ", ".join(m.throttle_reasons_seen or []) or EMPTY
        seen: str | Cell = Cell(f"THROTTLED: {reasons}", "warn") if m.throttled else reasons
        energy: str | Cell = fmt(m.energy_j, 1) if m.energy_error is None else Cell(short(m.energy_error, 120), "warn")
        rows.append([r.framework, fmt(r.repeat, 0), _three(readings, "sm_clock_mhz"), _three(readings, "power_w"),
                     fmt(limit, 0), _three(readings, "temperature_c"), seen, energy, fmt(m.joules_per_token, 4),
                     fmt(m.avg_power_w, 0)])
    return rows


def failure_rows(sweep: Sweep) -> list[list[str | Cell]]:
    """Failed and invalid runs with their reason and log, and the failed attempts retried since."""
    rows = []
    for r in sweep.runs:
        for a in r.previous_attempts:  # failed attempts set aside by `run --retry-failed`
            rows.append([r.framework, fmt(r.repeat, 0), Cell(f"{a.status}, then retried", "warn"),
                         short(a.reason, 1000), f"`{a.file}`" if a.file else EMPTY])
        if r.ok and r.valid:
            continue
        why = short(r.reason, 1000) if not r.ok else "; ".join(r.invalid_reasons) or "marked invalid"
        rows.append([r.framework, fmt(r.repeat, 0), Cell(str(r.status) if not r.ok else "ok but INVALID", "bad"),
                     Cell(why, "bad"), f"`{r.log}`" if r.log else EMPTY])
    return rows


def _norm_optimizer(v: Any) -> Any:
    return OPTIMIZER_NAMES.get(str(v).lower(), v) if v is not None else v


def setting_differs(key: str, want: Any, got: Any) -> bool:
    """Mirror of measuring.effective.check for one key (a key the adapter could not read is not a difference)."""
    if key == "seq_len_max":
        return got is not None and want is not None and got > want
    if got is None and want is not None:
        return False
    got = same_setting(key, got)
    if key == "optimizer":
        got, want = _norm_optimizer(got), _norm_optimizer(want)
        if {got, want} <= {"adamw_torch", "adamw_torch_fused"}:
            return False
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(got - want) > 1e-9 * max(1.0, abs(want))
    return got != want


def _setting_text(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "[]"
    if v is None:
        return EMPTY
    return str(v)


def effective_table(sweep: Sweep) -> tuple[list[str], list[list[str | Cell]]] | None:
    """Settings x frameworks: what the scenario asked for and what each framework ran with (repeat 0)."""
    first = {}
    for fw in sweep.framework_order():
        runs = sorted((r for r in sweep.runs_of(fw) if r.effective), key=lambda r: r.repeat)
        if runs:
            first[fw] = runs[0]
    if not first:
        return None
    expected: dict[str, Any] = {}
    for r in first.values():
        for k, v in r.expected.items():
            expected.setdefault(k, v)
    keys = list(expected) + sorted({k for r in first.values() for k in r.effective} - set(expected) - {"seq_len"})
    header = ["setting", "scenario"] + list(first)
    rows = []
    for k in keys:
        row: list[str | Cell] = [f"`{k}`", _setting_text(expected.get(k)) if k in expected else EMPTY]
        for r in first.values():
            eff = r.effective
            got = eff.get("seq_len") if k == "seq_len_max" else eff.get(k)
            present = ("seq_len" if k == "seq_len_max" else k) in eff
            text = _setting_text(got) if present else "not read"
            differs = k in expected and present and setting_differs(k, expected[k], got)
            row.append(Cell(text + (" ≠" if differs else ""), "diff" if differs else None))
        rows.append(row)
    return header, rows


# what adapters record in a run's ``extra`` about how they fed their tool and where it differs (shown as notes)
NOTE_KEYS = ("differences", "data", "data_order", "packing", "rerun_note", "tool_rule")


def how_run_rows(sweep: Sweep) -> list[list[str]]:
    """One row per framework (its first stored run): native config file, rerun command, adapter notes."""
    rows, seen = [], set()
    for r in sorted(sweep.runs, key=lambda r: (r.repeat, r.framework)):
        if r.framework in seen:
            continue
        seen.add(r.framework)
        notes: list[str] = []
        for k in NOTE_KEYS:
            v = r.extra.get(k)
            notes += [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else [])
        trainer = r.extra.get("trainer") or {}
        # a class name: trainer_class, or ``trainer`` itself in some stored Unsloth preference runs
        if cls := r.extra.get("trainer_class") or (trainer if isinstance(trainer, str) else None):
            notes.append(f"trainer: {cls}")
        if isinstance(trainer, dict) and trainer.get("overrides"):
            notes.append("trainer knobs: " + ", ".join(f"{k}={v}" for k, v in trainer["overrides"].items()))
        native = Path(r.native_config).name if r.native_config else EMPTY
        rerun = r.extra.get("rerun")
        rows.append([r.framework, native, f"`{short(rerun, 300)}`" if rerun else EMPTY,
                     "; ".join(short(n, 400) for n in notes) or EMPTY])
    return rows


def scenario_rows(sweep: Sweep) -> list[list[str]]:
    """The scenario's settings that decide the numbers, one per row."""
    sc = sweep.scenario
    model = sc.get("model") or {}
    method = sc.get("method") or {}
    data = sc.get("data") or {}
    train = sc.get("train") or {}
    quant = method.get("quant") or {}
    model_txt = model.get("preset") or EMPTY
    if model.get("weights") not in (None, "random"):
        model_txt = f"{model.get('weights')}"
    elif model.get("preset"):
        model_txt += " (random weights)"
    if isinstance(ws := model.get("warm_start"), dict):  # harness.inputs.warmstart: every framework starts from it
        model_txt += f", warm-started: {ws.get('steps')} SFT steps on {ws.get('data')}"
    method_txt = str(method.get("kind", EMPTY))
    if method.get("kind") in ("lora", "qlora", "dora"):
        method_txt += (f" r={method.get('lora_r')} alpha={method.get('lora_alpha')} "
                       f"targets={method.get('target_modules')}")
    if quant:
        method_txt += f" {quant.get('bits', 4)}-bit {quant.get('quant_type', '')}"
    device = (sc.get("hardware") or {}).get("device") or (sweep.runs[0].device if sweep.runs else None)
    return [
        ["model", model_txt], ["method", method_txt], ["data", data_text(sweep)],
        ["seq_len", f"{fmt(data.get('seq_len'), 0)} ({data.get('lengths', 'fixed')}, packing "
                    f"{'on' if data.get('packing') else 'off'})"],
        ["micro_batch", fmt(train.get("micro_batch"), 0)], ["grad_accum", fmt(train.get("grad_accum"), 0)],
        ["steps", fmt(train.get("steps"), 0)], ["warmup (untimed) steps", fmt(train.get("warmup_steps"), 0)],
        ["precision", str(model.get("dtype") or EMPTY)],
        ["gradient checkpointing", fmt(train.get("gradient_checkpointing"))],
        ["optimizer / lr", f"{train.get('optimizer', EMPTY)} / {train.get('lr', EMPTY)}"],
        ["device", f"{device or EMPTY} ({sweep.environment.gpu_name or 'no GPU'})"],
        ["repeats", fmt((sc.get("measure") or {}).get("repeats"), 0)],
        ["baseline framework", sweep.baseline],
        ["scenario hash", str(sweep.plan.get("scenario_hash") or EMPTY)],
    ]


def data_text(sweep: Sweep) -> str:
    """What every framework trained on: the source, and from the dataset file's record (``RunResult.dataset``) its
    rows, how many times the source's rows were read over, and the rows left out."""
    data = sweep.scenario.get("data") or {}
    src = "synthetic" if data.get("source", "synthetic") == "synthetic" else str(data.get("path") or EMPTY)
    meta = next((r.dataset for r in sweep.runs if r.dataset), None)
    if not meta:
        return src
    out = f"{src} ({meta.get('format', EMPTY)}): {fmt(meta.get('rows'), 0)} rows"
    if (passes := meta.get("passes") or 1) > 1 and isinstance(meta.get("rows"), int):
        out += (f": its {fmt(meta['rows'] // passes, 0)} read {passes} times over, in order (the steps read more "
                "rows than it holds)")
    if left := meta.get("rows_without_loss_left_out"):
        out += f"; {left} left out (no loss-bearing token within seq_len)"
    return out


def _run_environment(sweep: Sweep) -> Environment | None:
    """The environment the first worker that ran recorded (the sweep's own is the runner's, without torch)."""
    return next((r.environment for r in sweep.runs if r.environment is not None), None)


def environment_rows(sweep: Sweep) -> list[list[str]]:
    """GPU, driver, CUDA, CPU, host, git sha, and the knob environment variables the runs saw."""
    env = sweep.environment
    run_env = _run_environment(sweep) or Environment()
    cuda = run_env.torch_cuda or env.torch_cuda
    cuda_drv = env.cuda_driver_version or run_env.cuda_driver_version
    sha = env.git_sha
    rows = [
        ["GPU", f"{env.gpu_name or EMPTY} x{env.gpu_count or 0}"
                + (f" ({fmt(env.gpu_memory_gib, 1)} GiB)" if env.gpu_memory_gib else "")],
        ["driver", str(env.driver or EMPTY)],
        ["CUDA (torch build / driver API)", f"{cuda or EMPTY} / {cuda_drv or EMPTY}"],
        ["CPU", f"{env.cpu or EMPTY} ({env.cpu_count or EMPTY} cores)"],
        ["host", f"{env.hostname or EMPTY}, {env.platform or EMPTY}, Python {env.python or EMPTY}"],
        ["git sha", (f"`{sha}`" if sha else EMPTY) + (" (uncommitted changes)" if env.git_dirty else "")],
    ]
    if env.nvml_error and not env.gpu_name:
        rows.append(["NVML", f"not available: {short(env.nvml_error, 200)}"])
    # the workers' knob variables (what the runs saw), else the runner's; None where a result did not record them
    variables = run_env.variables if run_env.variables is not None else env.variables
    if variables is not None:
        rows.append(["environment variables (knobs)",
                     ", ".join(f"`{k}={short(str(v), 80)}`" for k, v in variables.items()) or "none set"])
    return rows


FRAMEWORK_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "triton")


def framework_env_row(fw: str, runs: list) -> list[str]:
    """A framework's version, the environment it ran in, and the library versions its worker saw (its first run
    that recorded them)."""
    r = next((x for x in runs if x.environment is not None), runs[0] if runs else None)
    lib = r.environment.libraries if r is not None and r.environment is not None else {}
    version, env = (r.framework_version, r.env) if r is not None else (None, None)
    return [fw, str(version or EMPTY), str(env or EMPTY)] + [str(lib.get(x) or EMPTY) for x in FRAMEWORK_LIBRARIES]


def framework_env_rows(sweep: Sweep) -> list[list[str]]:
    """:func:`framework_env_row` of every framework of the sweep."""
    return [framework_env_row(fw, sweep.runs_of(fw)) for fw in sweep.framework_order()]


def foreign_processes(sweep: Sweep) -> list[str]:
    """Processes of others found on the GPU at sweep start or by a worker, one line each."""
    out = []
    places = [("sweep start", sweep.environment)] + [(r.key, r.environment) for r in sweep.runs]
    for where, env in places:
        for p in env.foreign_gpu_processes if env is not None else []:
            out.append(f"{where}: pid {p.pid} on GPU {p.gpu} using {fmt(p.used_gib)} GiB")
    return out
