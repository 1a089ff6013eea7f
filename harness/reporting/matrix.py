"""The support matrix report: family x framework x method -> ok, the tool's own error, or why not, with the loss
trend and the library versions it was measured on (``report.md`` and a self-contained ``report.html``).

Read only from the matrix folder's stored runs (:mod:`harness.analysis.matrix`), so it can be written again at
any time: ``python -m harness matrix --report-from results/support-matrix-<device>-<time>``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness.analysis.matrix import INVALID, NOT_FALLING, NOT_RUN, OK, UNSUPPORTED, MatrixCell, read_matrix, versions
from harness.common.paths import REPO_ROOT
from harness.inputs.models import FAMILIES, presets
from harness.reporting.document import Cell, Doc, short
from harness.running import matrix as planning
from harness.storing.results import atomic_write_text

METHOD_TITLES = {"lora": "LoRA", "qlora": "QLoRA", "full": "Full fine-tuning"}
VERSION_COLUMNS = ("version", "machine", "code", "torch", "transformers", "peft", "trl", "bitsandbytes",
                   "accelerate")


def _mark(cell: MatrixCell) -> str | None:
    if cell.outcome == OK:
        return "good"
    if cell.outcome in (INVALID, NOT_FALLING):
        return "warn"
    if cell.outcome in (UNSUPPORTED, NOT_RUN):
        return None
    return "bad"  # the tool failed: error, oom, crashed, timeout, diverged, unreadable


def _loss(cell: MatrixCell) -> str:
    if cell.loss_first is None:
        return ""
    trend = {True: "falling", False: "not falling", None: "too few steps"}[cell.loss_falling]
    return f"loss {cell.loss_first:.2f}→{cell.loss_last:.2f} ({trend})"


def _shown(folder: Path) -> str:
    """The folder relative to the repository (``results/...``) when it is inside it: the same text on every
    machine that regenerates the report."""
    try:
        return str(folder.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(folder)


def grid_text(cell: MatrixCell, baseline: str | None = None, n: int = 90) -> str:
    """A cell of the grid: the outcome, a short reason where it is not ok, the loss trend where it trained, and
    (for a framework other than ``baseline``) how far its loss curve lies from the baseline's."""
    parts = [cell.outcome + (f": {short(cell.detail, n)}" if cell.detail and cell.outcome != OK else "")]
    if loss := _loss(cell):
        parts.append(loss)
    if cell.parity is not None and cell.framework != baseline:
        verdict = "" if cell.parity_ok else f"{cell.parity}, "
        parts.append(f"vs {baseline}: {verdict}max |Δloss| {cell.parity_max_abs_diff:.2g}")
    return "; ".join(parts)


def matrix_doc(folder: Path) -> Doc:
    """The report of the matrix in ``folder`` as a :class:`Doc`."""
    plan, cells = read_matrix(folder)
    frameworks, device = plan["frameworks"], plan["device"]
    vers = versions(folder, cells)
    machines = sorted({v["machine"] for v in vers.values() if v.get("machine")})
    doc = Doc(f"Support matrix: {device}" + (f" ({', '.join(machines)})" if machines else ""))
    ran = [c for c in cells if c.outcome not in (UNSUPPORTED, NOT_RUN)]
    doc.p(f"Each model family's tiny test model trained by every framework with each method: {planning.STEPS} "
          f"optimizer steps of {planning.MICRO_BATCH} x {planning.SEQ_LEN} tokens (synthetic text), lr "
          f"{planning.LR:g}, gradient checkpointing, LoRA r={planning.LORA_R} alpha={planning.LORA_ALPHA} on "
          f"`all-linear` (per family below), {'float32' if device == 'cpu' else 'bfloat16'} on {device}. A cell "
          f"is **ok** when the run finished, the settings read back from the live run match the scenario and the "
          f"loss fell (the mean of the second half of the steps below that of the first); otherwise it shows the "
          f"tool's own error, the settings that differed, or why the framework cannot run it. {len(ran)} of "
          f"{len(cells)} cells ran, {sum(c.outcome == OK for c in cells)} ok.")
    if shared := sum(bool(c.shared_machine) for c in cells):
        doc.p(f"{shared} of the runs shared the machine with other rows of the matrix (`--jobs`): the matrix records "
              f"which tool trains which family, not how fast; those runs' timings are not comparable.")
    doc.p(f"Results: `{_shown(folder)}` (one sweep per model and method; the generated scenarios in "
          f"`{planning.SCENARIO_DIR}/`, each rerunnable with `python -m harness run`). Again: `python -m harness "
          f"matrix --device {device} --families {','.join(dict.fromkeys(c.family for c in cells))} --frameworks "
          f"{','.join(frameworks)} --methods {','.join(plan['methods'])}`.")
    doc.h(1, "Summary")
    counts = {fw: Counter(c.outcome for c in cells if c.framework == fw) for fw in frameworks}
    outcomes = [o for o in (OK, INVALID, NOT_FALLING) if any(o in k for k in counts.values())]
    outcomes += sorted({o for k in counts.values() for o in k} - {OK, INVALID, NOT_FALLING, UNSUPPORTED, NOT_RUN})
    outcomes += [o for o in (UNSUPPORTED, NOT_RUN) if any(o in k for k in counts.values())]
    baseline = frameworks[0]
    alike = {fw: sum(bool(c.parity_ok) for c in cells if c.framework == fw) for fw in frameworks}
    doc.table(["framework", *outcomes, f"loss curve as {baseline}'s"],
              [[fw, *[str(counts[fw].get(o, 0)) for o in outcomes], "—" if fw == baseline else str(alike[fw])]
               for fw in frameworks])
    doc.p(f"The last column counts the cells whose loss curve stays within the parity tolerance of {baseline}'s on "
          f"the same model and method (docs/measurement.md, \"Quality\"); each cell gives its largest per-step "
          f"difference.")
    titles = {name: p.title for name, p in presets().items()}
    for method in plan["methods"]:
        doc.h(1, METHOD_TITLES.get(method, method))
        reasons = {c.detail if c.outcome == UNSUPPORTED else None for c in cells if c.method == method}
        if len(reasons) == 1 and None not in reasons:  # QLoRA on a CPU: one reason for every cell
            doc.p(f"Every cell unsupported: {reasons.pop()}")
            continue
        rows = []
        for model in plan["models"]:
            row_cells = {c.framework: c for c in cells if c.model == model and c.method == method}
            if not row_cells:
                continue
            rows.append([titles.get(model, model), model,
                         *[Cell(grid_text(row_cells[fw], baseline), _mark(row_cells[fw])) if fw in row_cells else ""
                           for fw in frameworks]])
        doc.table(["family", "tiny model", *frameworks], rows)
    failed = [c for c in cells if c.outcome not in (OK, UNSUPPORTED, NOT_RUN)]
    if failed:
        doc.h(1, "Why cells are not ok")
        doc.table(["model", "method", "framework", "outcome", "tool's message / differences", "run"],
                  [[c.model, c.method, c.framework, Cell(c.outcome, _mark(c)), short(c.detail, 600), c.run or ""]
                   for c in failed])
    doc.h(1, "Families")
    doc.p("`all-linear` is what a scenario's `target_modules: all-linear` trains, per family: the decoder's linear "
          "modules in transformers 5, the LM head left out. In the mixture-of-experts families the experts are 3-D "
          "parameter tensors, not linear modules, so it is the attention projections (harness/inputs/models.py).")
    tiny_by_family: dict[str, list[str]] = {}
    for name in plan["models"]:
        fam = next((c.family for c in cells if c.model == name), None)
        if fam:
            tiny_by_family.setdefault(fam, []).append(name)
    doc.table(["family", "model types", "tiny models", "all-linear", "MoE"],
              [[f"{f.title} (`{f.name}`)", ", ".join(f.model_types), ", ".join(tiny_by_family[f.name]),
                ", ".join(f.linear_modules), "yes" if f.moe else "no"]
               for f in FAMILIES.values() if f.name in tiny_by_family])
    doc.h(1, "Measured on")
    doc.table(["framework", *VERSION_COLUMNS],
              [[fw, *[vers.get(fw, {}).get(k, "—") for k in VERSION_COLUMNS]] for fw in frameworks if fw in vers])
    return doc


def write_matrix_report(folder: Path, out_dir: Path) -> Path:
    """Write ``report.md`` and ``report.html`` of the matrix in ``folder`` into ``out_dir``; returns the .md path."""
    doc = matrix_doc(Path(folder))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.html", doc.to_html())
    md = out_dir / "report.md"
    atomic_write_text(md, doc.to_markdown())
    return md
