"""Batches as the trainer feeds them: which rows form each micro-batch, and how a micro-batch is padded.

Data order is the HF Trainer's sequential sampler and epoch loop (transformers 5 ``Trainer._inner_training_loop``,
``dataloader_drop_last`` off): each epoch reads the rows in order, ``micro_batch`` rows per forward (the epoch's
last micro-batch keeps the leftover rows), ``grad_accum`` micro-batches per optimizer step (the epoch's last step
takes the leftover micro-batches); the next epoch starts again at row 0. Where the rows fill whole steps this is
plain wrap-around; where they do not, the short step matters: wrapping around instead mixes the next epoch's
first rows into it and shifts every later step's rows against the Trainer's (tiny-llama fp32, 19 rows, micro-batch
4 x 2: losses 1e-2 to 4e-2 apart from step 3 on).

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


def step_rows(n_rows: int, s: TrainSettings, step: int) -> list[range]:
    """Row indices of each micro-batch of optimizer step ``step`` (0-based), as the HF Trainer reads them.

    Args:
        n_rows: rows in the data (one epoch).
        s: loop settings (``micro_batch``, ``grad_accum``).
        step: optimizer step, counted over all epochs.

    Returns:
        One range per micro-batch: ``grad_accum`` full ones, except at the end of an epoch, whose last step
        has the micro-batches left (the last one possibly short).
    """
    if n_rows < 1:
        raise ValueError("no rows to train on")
    per_epoch = -(-n_rows // s.micro_batch)  # micro-batches per epoch (the last one may be short)
    steps_per_epoch = -(-per_epoch // s.grad_accum)
    first = (step % steps_per_epoch) * s.grad_accum
    return [range(j * s.micro_batch, min((j + 1) * s.micro_batch, n_rows))
            for j in range(first, min(first + s.grad_accum, per_epoch))]


def micro_batches(rows: Sequence[dict], s: TrainSettings, step: int, device: torch.device | str) -> list[dict]:
    """The collated micro-batches of optimizer step ``step`` (0-based), on ``device`` (:func:`step_rows`)."""
    return [{k: v.to(device, non_blocking=True) for k, v in collate([rows[i] for i in idx], s.pad_id).items()}
            for idx in step_rows(len(rows), s, step)]


def static_length(rows: Sequence[dict]) -> int:
    """The longest row: the static length of a CUDA-graphed step's buffers."""
    return max(len(r["input_ids"]) for r in rows)
