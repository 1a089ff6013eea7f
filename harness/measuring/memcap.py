"""A memory budget per run (``hardware.memory_budget_gib``), applied by the worker before any tool loads.

One mechanism for every framework: PyTorch's per-process memory fraction,
``torch.cuda.set_per_process_memory_fraction(budget / device total)``, on each visible GPU. It bounds what torch's
caching allocator may reserve; an allocation beyond it raises torch's ``OutOfMemoryError`` as a real full GPU
would, so the tool fails (status ``oom``) the way it fails on a smaller card. What goes through that allocator:
every tensor the tools create, the 4-bit weights and quantisation state of bitsandbytes (torch tensors), the
buffers of Triton kernels (ours, Unsloth's, Liger's: torch allocates their inputs and outputs), cuBLAS
workspaces. What does not: the CUDA context and the kernels' code (~0.5 GiB), NCCL's own buffers,
``cudaMallocManaged`` pages (bitsandbytes' paged optimizers) and anything a library allocates with
``cudaMalloc`` itself. A card of N GiB holds those too, so torch's share of the budget is what is left of it once
they are counted: the CUDA context is created first and NVML's figure for this process then, less what torch holds,
is taken off the budget, with :data:`LATE_RESERVE_GIB` more for the kernels and library handles that load later
(lazily, on first use: 0.81 GiB outside torch at the peak of the H200's 8 GiB probes, against ~0.5 at start).
Where NVML does not show this process, :data:`OUTSIDE_TORCH_GIB` stands in, and the run says so. The whole process
is checked afterwards as well: a run whose NVML per-process peak exceeds the budget is invalid (:func:`check`),
with the figures in the reason.

On a CPU there is no honest equivalent (``RLIMIT_AS`` bounds virtual address space, which PyTorch and its
thread pools reserve far beyond what they touch), so validation refuses a budget with device ``cpu`` except for
an adapter that simulates its memory for tests (the dummy's ``sim_gib_per_token``): there the adapter itself
raises the out-of-memory error.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3
LATE_RESERVE_GIB = 0.35  # outside torch, loaded after the cap is set (kernels on first use, cuBLAS/cuDNN handles)
OUTSIDE_TORCH_GIB = 0.55  # the CUDA context with torch loaded, where NVML cannot measure this process
MIN_TORCH_GIB = 0.25  # torch's share never goes below this (a budget this small fails as a real card would)


def apply(budget_gib: float | None, device: str) -> dict[str, Any]:
    """Apply a memory budget to this process before the tool loads.

    Args:
        budget_gib: the budget (None: no cap; nothing is done).
        device: ``"cuda"`` or ``"cpu"``.

    Returns:
        What was applied, stored with the run's metrics: ``memory_budget_gib``, ``memory_fraction`` (per GPU;
        None on a CPU), ``memory_cap_by`` (how it is enforced), ``gpu_total_gib``, on a GPU ``torch_cap_gib``
        (torch's share), ``outside_torch_gib`` with ``outside_torch_by`` (what was taken off the budget for the
        CUDA context, and how it was known) and ``late_reserve_gib``, and, when the budget is more than the GPU
        holds, ``memory_cap_note``. Empty without a budget.
    """
    if budget_gib is None:
        return {}
    if device != "cuda":
        return {"memory_budget_gib": budget_gib, "memory_fraction": None, "gpu_total_gib": None,
                "memory_cap_by": "simulated by the adapter (no per-process cap on a cpu)"}
    import torch  # heavy: the worker's environment only

    from harness.measuring.nvml_sampler import process_used_bytes  # pynvml, imported where a GPU is used

    dev = torch.cuda.current_device()
    torch.cuda.mem_get_info(dev)  # creates this process's CUDA context: what sits outside torch is measurable now
    used = process_used_bytes(dev)
    outside = (used - torch.cuda.memory_reserved(dev)) / GIB if used is not None else OUTSIDE_TORCH_GIB
    torch_gib = max(MIN_TORCH_GIB, budget_gib - outside - LATE_RESERVE_GIB)
    totals = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    total = min(totals)
    fraction = min(1.0, torch_gib * GIB / total)
    for i in range(len(totals)):
        torch.cuda.set_per_process_memory_fraction(torch_gib * GIB / totals[i] if fraction < 1.0 else 1.0, i)
    out = {"memory_budget_gib": budget_gib, "memory_fraction": fraction, "gpu_total_gib": total / GIB,
           "memory_cap_by": "torch.cuda.set_per_process_memory_fraction", "torch_cap_gib": torch_gib,
           "outside_torch_gib": outside, "late_reserve_gib": LATE_RESERVE_GIB,
           "outside_torch_by": "NVML, this process after its CUDA context" if used is not None
           else f"estimate ({OUTSIDE_TORCH_GIB} GiB): NVML does not show this process"}
    if fraction >= 1.0:
        out["memory_cap_note"] = (f"budget {budget_gib:g} GiB is at least the GPU's {total / GIB:.1f} GiB: "
                                  "the whole GPU, no cap")
    return out


def check(cap: dict[str, Any], metrics: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Whether a finished run stayed within its memory budget.

    Args:
        cap: what :func:`apply` returned.
        metrics: the run's metrics (``peak_vram_nvml_gib``, ``peak_reserved_gib``).

    Returns:
        ``(invalid_reasons, warnings)``: a run whose NVML per-process peak exceeds the budget is invalid; a GPU
        run without an NVML peak is checked against torch's reserved peak, with a warning saying so.
    """
    budget = cap.get("memory_budget_gib")
    if budget is None or cap.get("memory_fraction") is None:
        return [], []
    notes = [cap["memory_cap_note"]] if cap.get("memory_cap_note") else []
    nvml = metrics.get("peak_vram_nvml_gib")
    if nvml is not None:
        return ([over_budget_reason(nvml, budget)] if nvml > budget else []), notes
    reserved = metrics.get("peak_reserved_gib")
    warn = notes + ["NVML per-process peak not measured: the memory budget was checked against torch's reserved "
                    "peak only (the CUDA context and allocations outside torch not counted)"]
    if reserved is not None and reserved > budget:
        return [f"memory budget exceeded: torch reserved {reserved:.2f} GiB > {budget:g} GiB"], warn
    return [], warn


OVER_BUDGET = "memory budget exceeded"  # the start of the invalid reason: the frontier reads it as "does not fit"


def over_budget_reason(peak_gib: float, budget_gib: float) -> str:
    """The invalid reason of a run whose NVML per-process peak is above its budget."""
    return f"{OVER_BUDGET}: NVML per-process peak {peak_gib:.2f} GiB > {budget_gib:g} GiB"
