"""The trainer's own batches (:mod:`kernels.trainer.batches`): data order, and padding identical to the harness's.

The tunebench adapter hands the trainer the harness's tokenised rows and the harness's step meter counts the
micro-batches the trainer collates, so the trainer's ``collate`` must give exactly the tensors of
``harness.inputs.data.collate`` (same padding, mask, labels and position_ids) for token counts to agree with every
other framework's.
"""

from __future__ import annotations

import random

import pytest
import torch

from harness.inputs.data import collate as harness_collate
from harness.inputs.data import pack
from kernels.trainer.batches import IGNORE_INDEX, collate, micro_batches, static_length
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


def test_micro_batches_follow_the_sequential_order():
    rows = _rows(5, seed=3)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=3, pad_id=PAD)
    # step 1 covers rows 4, 0 (wrapping around) and 1, 2
    first, second = micro_batches(rows, s, 1, "cpu")
    for got, idx in ((first, (4, 0)), (second, (1, 2))):
        want = collate([rows[i] for i in idx], PAD)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert static_length(rows) == max(len(r["input_ids"]) for r in rows)
