"""The trainer's own batches (:mod:`kernels.trainer.batches`): data order, and padding identical to the harness's.

The tunebench adapter hands the trainer the harness's tokenised rows and the harness's step meter counts the
micro-batches the trainer collates, so the trainer's ``collate`` must give exactly the tensors of
``harness.inputs.data.collate`` (same padding, mask, labels and position_ids) for token counts to agree with every
other framework's.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from harness.inputs.data import collate as harness_collate
from harness.inputs.data import pack
from kernels.trainer.batches import IGNORE_INDEX, collate, micro_batches, static_length, step_rows
from kernels.trainer.config import TrainSettings

PAD = 258


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [256] + [rng.randrange(97, 123) for _ in range(rng.randint(3, 20))] + [257]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return rows


@pytest.mark.parametrize("packed", [False, True])
def test_collate_gives_the_harness_tensors(packed):  # noqa: ANN001
    rows = pack(_rows(9, seed=1), 40) if packed else _rows(3, seed=2)
    assert ("position_ids" in rows[0]) == packed and len({len(r["input_ids"]) for r in rows}) > 1  # padding needed
    ours, theirs = collate(rows, PAD), harness_collate(rows, PAD)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_micro_batches_follow_the_trainers_epochs():
    """5 rows, micro-batch 2 x 2 (the HF Trainer's sequential sampler, dataloader_drop_last off): each epoch is
    micro-batches (0, 1), (2, 3), (4,); step 0 takes the first two, step 1 the short rest, step 2 starts the next
    epoch at row 0 (no wrap-around mixing epochs)."""
    rows = _rows(5, seed=3)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=4, pad_id=PAD)
    want_steps = [[(0, 1), (2, 3)], [(4,)], [(0, 1), (2, 3)], [(4,)]]
    assert [[tuple(r) for r in step_rows(len(rows), s, step)] for step in range(4)] == want_steps
    for got, idx in zip(micro_batches(rows, s, 1, "cpu") + micro_batches(rows, s, 2, "cpu"), [(4,), (0, 1), (2, 3)],
                        strict=True):
        want = collate([rows[i] for i in idx], PAD)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert static_length(rows) == max(len(r["input_ids"]) for r in rows)


@pytest.mark.parametrize(("n_rows", "micro_batch", "grad_accum"), [(12, 2, 3), (13, 2, 3), (7, 3, 1), (1, 4, 2)])
def test_step_rows_cover_each_epoch_once(n_rows, micro_batch, grad_accum):  # noqa: ANN001
    """Every epoch reads every row exactly once, in order; whole steps where the rows fill them (then it is plain
    wrap-around), one short step at the end otherwise."""
    s = TrainSettings(micro_batch=micro_batch, grad_accum=grad_accum, steps=1, pad_id=PAD)
    per_epoch = math.ceil(math.ceil(n_rows / micro_batch) / grad_accum)  # optimizer steps per epoch
    for epoch in range(2):
        steps = [step_rows(n_rows, s, epoch * per_epoch + k) for k in range(per_epoch)]
        assert [i for step in steps for r in step for i in r] == list(range(n_rows))
        assert all(len(step) == grad_accum for step in steps[:-1])
    if n_rows % (micro_batch * grad_accum) == 0:
        for step in range(3 * per_epoch):
            start = step * micro_batch * grad_accum % n_rows
            assert [i for r in step_rows(n_rows, s, step) for i in r] == list(
                range(start, start + micro_batch * grad_accum))
