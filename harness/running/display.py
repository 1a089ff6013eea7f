"""The sweep's live progress display (rich): the sweep, the current run and its live tokens/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.storing.schema import STATUS_OK


class Display:
    """Progress display (rich): the sweep, the current run and its live tokens/s."""

    def __init__(self, total: int, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                                 transient=False)
        self.sweep = self.progress.add_task("sweep", total=total, info="")
        self.run = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *a):
        self.progress.__exit__(*a)

    def start_run(self, key: str, steps: int):
        self.run = self.progress.add_task(f"  {key}", total=steps, info="starting")

    def update_run(self, prog: dict):
        if self.run is None:
            return
        tps = prog.get("tokens_per_s")
        loss = prog.get("loss")
        info = (f"{tps:,.0f} tok/s" if tps else "") + (f"  loss {loss:.3f}" if loss is not None else "")
        self.progress.update(self.run, completed=prog.get("step", 0), info=info)

    def end_run(self, key: str, res: dict):
        if self.run is not None:
            self.progress.remove_task(self.run)
            self.run = None
        self.progress.advance(self.sweep)
        m = res.get("metrics") or {}
        if res["status"] == STATUS_OK:
            tps, vram = m.get("tokens_per_s"), m.get("peak_vram_nvml_gib")
            msg = f"[green]ok[/] {tps:,.0f} tok/s" if tps else "[green]ok[/]"
            msg += f", peak {vram:.2f} GiB (NVML)" if vram is not None else ""
            msg += f", final loss {m['final_loss']:.4f}" if m.get("final_loss") is not None else ""
            if not res.get("valid", True):
                msg += f" [yellow]INVALID: {'; '.join(res.get('invalid_reasons', []))}[/]"
        else:
            msg = f"[red]{res['status']}[/]: {str(res.get('reason'))[:300]}"
        self.console.print(f"{key}: {msg}", markup=True, highlight=False)
