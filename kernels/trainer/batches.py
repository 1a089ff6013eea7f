"""Batches as the trainer feeds them: which rows form each micro-batch, and how a micro-batch is padded.

Data order is the HF Trainer's sequential sampler: rows in order, ``micro_batch`` rows per forward,
``grad_accum`` micro-batches per optimizer step, wrapping around the rows.

A row is a dict of token lists: ``input_ids``, ``labels`` (:data:`IGNORE_INDEX` where no loss) and, for packed
rows (several samples per row), ``position_ids`` restarting at 0 per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.trainer.config import TrainSettings

IGNORE_INDEX = -100  # the label of a token that bears no loss (transformers' and PyTorch's convention)


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row.

    Args:
        rows: the micro-batch's rows.
        pad_id: token id of the padding.

    Returns:
        ``input_ids`` (pads: ``pad_id``), ``attention_mask`` (1 on real tokens), ``labels`` (pads:
        :data:`IGNORE_INDEX`), all ``[rows, longest]`` int64, and for packed rows ``position_ids`` (pads: 0,
        so each pad counts as a sample of its own and attends to nothing else).
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long) if "position_ids" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if pos is not None:
            pos[i, :n] = torch.tensor(r["position_ids"])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pos is not None:
        out["position_ids"] = pos
    return out


def micro_batches(rows: Sequence[dict], s: TrainSettings, step: int, device: torch.device | str) -> list[dict]:
    """The ``grad_accum`` collated micro-batches of optimizer step ``step`` (0-based), on ``device``."""
    out = []
    n = len(rows)
    for m in range(s.grad_accum):
        start = (step * s.grad_accum + m) * s.micro_batch
        chunk = [rows[(start + k) % n] for k in range(s.micro_batch)]
        out.append({k: v.to(device, non_blocking=True) for k, v in collate(chunk, s.pad_id).items()})
    return out


def static_length(rows: Sequence[dict]) -> int:
    """The longest row: the static length of a CUDA-graphed step's buffers."""
    return max(len(r["input_ids"]) for r in rows)
