"""The values a memory frontier tries (:mod:`harness.running.frontier`): a grid from the smallest valid value to the
model's maximum (seq_len) or :data:`MICRO_BATCH_MAX`, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from harness.inputs import models
from harness.spec.scenario import MAX_SEQ_LEN, Scenario

VARIES = ("seq_len", "micro_batch")
MIN_VALUE = {"seq_len": 8, "micro_batch": 1}  # the schema's smallest valid values
DEFAULT_STEP = {"seq_len": 256, "micro_batch": 1}  # seq_len: a bisection to the token is ~9 probes more, for nothing
MICRO_BATCH_MAX = 64  # the stated upper bound of a micro_batch frontier (--max changes it)


class FrontierError(ValueError):
    """The frontier cannot be run as asked (what to vary, the bounds); the message says why."""


@dataclass(frozen=True)
class Grid:
    """The values a frontier tries: ``lo``, the multiples of ``step`` between, and ``hi``."""

    vary: str
    lo: int
    hi: int
    step: int

    def values(self) -> list[int]:
        """Every candidate value, ascending."""
        first = -(-self.lo // self.step) * self.step
        return sorted({self.lo, self.hi, *range(first, self.hi + 1, self.step)})


def model_max_positions(sc: Scenario) -> int:
    """The model's ``max_position_embeddings`` (its preset's, else the checkpoint's config.json)."""
    if sc.model.preset is not None:
        return models.get_preset(sc.model.preset).max_position_embeddings
    cfg = models.load_config_dict(sc.model.weights)
    return int(cfg.get("max_position_embeddings") or MAX_SEQ_LEN)


def make_grid(sc: Scenario, vary: str, hi: int | None = None, step: int | None = None) -> Grid:
    """The grid of a frontier of ``sc`` over ``vary``, checked.

    Args:
        sc: the scenario.
        vary: ``seq_len`` or ``micro_batch``.
        hi: the upper bound; default the model's maximum (seq_len) or :data:`MICRO_BATCH_MAX`.
        step: grid spacing; default :data:`DEFAULT_STEP`.

    Raises:
        FrontierError: an unknown ``vary``, bounds out of range, or a seq_len frontier over data whose rows do not
            all have seq_len tokens (the probe would not measure that length).
    """
    if vary not in VARIES:
        raise FrontierError(f"--vary {vary!r}: one of {', '.join(VARIES)}")
    if vary == "seq_len" and not (sc.data.source == "synthetic" and sc.data.lengths == "fixed") \
            and not sc.data.packing:
        raise FrontierError("--vary seq_len needs rows of exactly seq_len tokens: synthetic data with lengths "
                            "fixed, or packing")
    top = model_max_positions(sc) if vary == "seq_len" else MICRO_BATCH_MAX
    hi = top if hi is None else hi
    step = DEFAULT_STEP[vary] if step is None else step
    lo = MIN_VALUE[vary]
    if vary == "seq_len" and hi > top:
        raise FrontierError(f"--max {hi}: beyond the model's maximum seq_len ({top})")
    if not lo <= hi:
        raise FrontierError(f"--max {hi}: below the smallest {vary} ({lo})")
    if step < 1:
        raise FrontierError(f"--step {step}: must be at least 1")
    return Grid(vary, lo, hi, step)
