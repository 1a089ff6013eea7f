"""What every hand loop shares: the sweep's rows in the HF Trainer's order, the step clock, the per-step log, the
token counts, torch's peak memory and the read-back of a transformers model's settings.

Nothing here comes from the harness's measurement path (no ``StepMeter``, no worker, no harness data loader): the
rows are rebuilt from the scenario as ``harness.running.prepare`` writes them, their digest is taken the same way,
and they are tokenised with the same functions the adapters use (``harness.inputs.data``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_for_tools import switches
from harness.inputs import data
from harness.measuring import effective
from harness.measuring.meter import sample_spans
from harness.measuring.nvml_sampler import GpuMemorySampler

GIB = 1024**3
# where each loop's clock starts and stops: the same boundaries as the harness's step (StepMeter's step_begin and
# step_end around one optimizer step, after the step's batches were fetched)
TIMING = ("device synchronised; from before the step's first forward to after zero_grad; the step's micro-batches "
          "collated and copied to the device before the clock starts")
DATA_ORDER = ("the sweep's rows in file order, micro_batch rows per forward, grad_accum micro-batches per step, "
              "epoch by epoch (the HF Trainer's sequential sampler)")


class Unavailable(RuntimeError):
    """The loop cannot run here (its tool is not importable, or it needs a GPU): a result, not a failure."""


def sweep_examples(sc, tokenizer) -> tuple[list[dict], str, dict[str, Any]]:  # noqa: ANN001
    """The sweep's rows as ``harness.running.prepare`` writes them for the scenario (``data.build_examples`` with
    the checkpoint's tokenizer), their format, and what identifies them: ``dataset_sha256_16``, the digest prepare
    records for the same file (each row ``json.dumps`` + newline, as ``data.write_jsonl`` writes it), the row
    count, format and order."""
    examples, fmt, _, _ = data.build_examples(sc, tokenizer)
    text = "".join(json.dumps(r) + "\n" for r in examples)
    return examples, fmt, {"dataset_sha256_16": hashlib.sha256(text.encode()).hexdigest()[:16],
                           "dataset_rows": len(examples), "data_format": fmt, "data_order": DATA_ORDER}


def sweep_rows(sc, tokenizer) -> tuple[list[dict], dict[str, Any]]:  # noqa: ANN001
    """The sweep's rows (:func:`sweep_examples`) tokenised as the adapters tokenise the dataset file
    (``data.tokenize_example``, packed when the scenario packs), and their settings."""
    examples, fmt, settings = sweep_examples(sc, tokenizer)
    rows = [data.tokenize_example(tokenizer, r, fmt, sc.data.seq_len, sc.data.prompt_loss) for r in examples]
    if sc.data.packing:
        rows = data.pack(rows, sc.data.seq_len)
    return rows, settings


def trainer_steps(rows: Sequence[dict], micro_batch: int, grad_accum: int, steps: int,
                  collate: Callable[[list[dict]], dict], pin_memory: bool) -> Iterator[list[dict]]:
    """The collated micro-batches of each optimizer step, as the HF Trainer reads them: a plain
    ``torch.utils.data.DataLoader`` (sequential, ``micro_batch`` rows per batch, the last one short) through
    :func:`loader_steps`. ``pin_memory`` as the Trainer's default (``dataloader_pin_memory``) on a GPU.
    """
    loader = torch.utils.data.DataLoader(list(rows), batch_size=micro_batch, shuffle=False, collate_fn=collate,
                                         pin_memory=pin_memory, num_workers=0)
    return loader_steps(loader, grad_accum, steps)


def loader_steps(loader: Iterable[dict], grad_accum: int, steps: int) -> Iterator[list[dict]]:
    """The micro-batches of each of ``steps`` optimizer steps from a data loader, as the HF Trainer groups them:
    ``grad_accum`` batches per step, the epoch's last step takes what is left, the next epoch starts afresh."""
    done = 0
    while True:
        step: list[dict] = []
        for batch in loader:
            step.append(batch)
            if len(step) == grad_accum:
                yield step
                done, step = done + 1, []
                if done == steps:
                    return
        if step:
            yield step
            done += 1
            if done == steps:
                return
        elif done == 0:
            raise ValueError("the data loader gave no batch")


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(non-padding tokens, loss-bearing tokens, widest row) of one collated micro-batch, read on the host before
    it is copied to the device (no device synchronisation inside the timed step)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else int(ids.numel())
    loss_tokens = int((batch["labels"][..., 1:] != data.IGNORE_INDEX).sum())
    widest = int(mask.sum(-1).max()) if mask is not None else int(ids.shape[-1])
    return tokens, loss_tokens, widest


class StepClock:
    """Times one optimizer step between two device synchronisations: CUDA events on a GPU, ``perf_counter`` on a
    CPU. The device is idle when the clock starts, so a step's time is its own work, not what was queued before."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = 0.0

    def begin(self) -> None:
        """Start the step's clock."""
        if self.cuda:
            torch.cuda.synchronize()
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def end(self) -> float:
        """Stop the clock after the step's work finished on the device; returns the step's seconds."""
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000
        return time.perf_counter() - self._t0


@dataclass
class StepLog:
    """What each optimizer step of a loop fed and took."""

    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss_tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rows: int = 0  # rows per micro-batch (max)
    micro_batches: int = 0  # micro-batches per step (max)
    widest: int = 0  # longest non-padding row
    samples: int = 0  # samples per micro-batch (max): more than rows where a tool joins samples padding-free
    longest_sample: int = 0

    def add(self, step_s: float, batches: list[dict[str, torch.Tensor]], loss: float) -> None:
        """Record one step: its time, its micro-batches (read after the clock stopped), its loss."""
        counts = [batch_tokens(b) for b in batches]
        self.step_s.append(step_s)
        self.tokens.append(sum(c[0] for c in counts))
        self.loss_tokens.append(sum(c[1] for c in counts))
        self.losses.append(loss)
        self.rows = max([self.rows] + [int(b["input_ids"].shape[0]) for b in batches])
        self.micro_batches = max(self.micro_batches, len(batches))
        self.widest = max([self.widest] + [c[2] for c in counts])
        for b in batches:
            mask = b.get("attention_mask")
            per_row = ([int(n) for n in mask.sum(-1).tolist()] if mask is not None
                       else [int(b["input_ids"].shape[-1])] * int(b["input_ids"].shape[0]))
            _, longest, samples = sample_spans(b, per_row)
            self.samples, self.longest_sample = max(self.samples, samples), max(self.longest_sample, longest)

    def summary(self, warmup_steps: int) -> dict[str, Any]:
        """Figures over the steps after ``warmup_steps``: tokens/s as tokens over the sum of step times (as the
        harness computes it), the median step time, and the losses."""
        warmup = min(warmup_steps, max(0, len(self.step_s) - 1))  # at least one measured step
        secs, toks = self.step_s[warmup:], self.tokens[warmup:]
        total = sum(secs)
        return {"steps": len(self.step_s), "warmup_steps": warmup, "steps_measured": len(secs),
                "tokens_per_s": sum(toks) / total if total > 0 else None,
                "loss_tokens_per_s": sum(self.loss_tokens[warmup:]) / total if total > 0 else None,
                "step_s_median": statistics.median(secs) if secs else None, "measured_s": total,
                "tokens_measured": sum(toks), "first_loss": self.losses[0] if self.losses else None,
                "final_loss": self.losses[-1] if self.losses else None, "step_s": self.step_s, "losses": self.losses}

    def geometry(self, packing: bool) -> dict[str, Any]:
        """Batch geometry in the keys and by the rules of ``harness.measuring.effective.from_meter``: without
        ``packing`` (the scenario's), rows holding several samples (position_ids restarting) are read in samples
        and said to be padding-free."""
        n = len(self.tokens)
        joined = not packing and self.rows < self.samples
        out = {"micro_batch": self.samples if joined else self.rows, "grad_accum": self.micro_batches,
               "seq_len": self.longest_sample if joined else self.widest,
               "tokens_per_step": sum(self.tokens) / n if n else None}
        return out | ({"padding_free_rows": True} if joined else {})


class MachineWatch:
    """What the machine did while a loop ran, from before its model loads to after its last step: torch's peaks
    (counters reset at the start, as the harness's meter does) and, on a GPU, the harness's NVML sampler in its
    monitor process beside the loop (nothing in the loop's interpreter): the NVML peaks, other processes on the GPU,
    clocks, power and throttle reasons at the start, at the highest power and at the end. With the host's load
    average at both ends, a loop whose steps spread widely shows whether the machine was shared or slowed."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.load_start = os.getloadavg()[0]
        self.sampler = GpuMemorySampler().start() if device == "cuda" else None

    def finish(self) -> dict[str, Any]:
        """torch's allocated and reserved peaks (GiB; None on a CPU), the host load, and the NVML readings."""
        out: dict[str, Any] = {"peak_alloc_gib": None, "peak_reserved_gib": None,
                               "host_load_1m": {"start": self.load_start, "end": os.getloadavg()[0]}}
        if self.device == "cuda":
            out |= {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        s = self.sampler
        if s is not None:
            s.stop()
            tel = s.telemetry.summary(None, None) if s.telemetry is not None else {}
            out |= s.readings() | {"telemetry": tel.get("telemetry"),
                                   "throttle_reasons_seen": tel.get("throttle_reasons_seen")}
        return out


def machine(device: str, libraries: Sequence[str]) -> dict[str, Any]:
    """Where the loop ran: device, GPU name (on a GPU), and the versions of ``libraries`` (``<name>_version`` keys,
    the names the stored run's environment uses)."""
    out: dict[str, Any] = {"device": device}
    if device == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name(0)
    for name in libraries:
        try:
            out[f"{name}_version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"{name}_version"] = None
    return out


def device_of(sc) -> str:  # noqa: ANN001
    """The scenario's device, checked: a CUDA scenario without a visible GPU is :class:`Unavailable`."""
    if sc.hardware.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("needs CUDA: no GPU visible to torch")
    return sc.hardware.device


def input_require_grads(model) -> bool:  # noqa: ANN001
    """Whether the input embeddings carry transformers' ``make_inputs_require_grads`` forward hook
    (``enable_input_require_grads``): the embedding output then requires grad, and backward runs down to it."""
    emb = model.get_input_embeddings()
    return any(getattr(h, "__name__", "") == "make_inputs_require_grads" for h in emb._forward_hooks.values())


def read_back_transformers(model, optimizer,  # noqa: ANN001
                           read_switches: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Settings of a live transformers/PEFT model and its optimizer, in the adapters' ``effective`` keys
    (``read_back_model``, ``read_back_optimizer`` and the switch read-back ``read_switches``), plus what only a
    hand loop records: attention implementation, input-grad hook, ``use_cache``."""
    config = getattr(model, "config", None)
    return (effective.read_back_model(model) | effective.read_back_optimizer(optimizer) | read_switches(model)
            | {"attn_implementation": getattr(config, "_attn_implementation", None),
               "input_require_grads": input_require_grads(model),
               "use_cache": getattr(config, "use_cache", None)})


def trainer_read_back(model) -> dict[str, Any]:  # noqa: ANN001
    """The switch read-back of every HF-Trainer-based row (Liger-Kernel, the checkpoint function)."""
    return switches.read_trainer_model(model)
