"""Did a run train at all? A run is only "ok" when its loss stayed finite, moved, and had tokens to learn from.

A learning rate of inf, data whose rows are all longer than ``seq_len`` (every label masked) or a hook that never
saw a loss all finish without an exception; without these checks such runs would be ranked beside real ones.
"""

from __future__ import annotations

import math
from typing import Any

STATUS_DIVERGED = "diverged"
MIN_STEPS_FOR_MOVEMENT = 3  # with fewer recorded losses a flat curve says nothing
FLAT_RTOL = 1e-6  # a loss that moved less than this (relative) over the whole run never moved


def check_training(steps: list[dict[str, Any]],
                   reward_curve: list[dict[str, Any]] | None = None) -> tuple[str | None, list[str]]:
    """(status override, invalid reasons) from a run's per-step records.

    Returns ``("diverged", [reason])`` when any recorded loss is NaN or infinite, else ``(None, reasons)``
    with a reason for each way the run failed to train: no loss-bearing tokens, a loss that never moved (with
    GRPO's ``reward_curve``, why where no group's rewards ever differed: every advantage was 0).
    """
    losses = [(s["step"], s.get("loss")) for s in steps if s.get("loss") is not None]
    bad = [(step, v) for step, v in losses if not math.isfinite(float(v))]
    if bad:
        step, v = bad[0]
        return STATUS_DIVERGED, [f"loss is {v} at step {step} ({len(bad)} of {len(losses)} recorded losses "
                                 f"not finite)"]
    reasons = []
    if steps and sum(int(s.get("loss_tokens") or 0) for s in steps) == 0:
        reasons.append("no loss-bearing tokens: every label was masked (rows longer than seq_len, or prompt-only "
                       "rows)")
    values = [float(v) for _, v in losses]
    if len(values) >= MIN_STEPS_FOR_MOVEMENT:
        scale = max(abs(x) for x in values) or 1.0
        if (max(values) - min(values)) <= FLAT_RTOL * scale:
            reasons.append(f"loss never moved: {values[0]:.6g} at every one of {len(values)} recorded steps")
            flat = [r.get("reward") for r in reward_curve or [] if not r.get("reward_std")]
            if reward_curve and len(flat) == len(reward_curve):
                reasons[-1] += (f" (GRPO: every completion of a group scored alike at every step, rewards "
                                f"{sorted(set(flat))}, so every advantage was 0: a model that never earns a "
                                "reward learns nothing; warm-start it, model.warm_start)")
    return None, reasons
