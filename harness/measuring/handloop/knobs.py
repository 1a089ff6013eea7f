"""The hf hand loop's knobs: each setting of an HF Trainer step, by name, with the Trainer's value as default.

Light (no torch): ``python -m harness selfcheck`` checks ``--set`` before it starts any loop. What each knob does
in the loop: :mod:`harness.measuring.handloop.trainer_loop`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HfKnobs:
    """The settings of an HF Trainer step; the defaults are what the hf adapter's Trainer runs."""

    use_reentrant: bool = False  # gradient_checkpointing_kwargs of the hf adapter's TrainingArguments
    input_require_grads: bool = True  # transformers 5 hooks the input embeddings when it enables checkpointing
    attention_mask: bool = True  # the harness's collate feeds it (ones on every real token)
    num_items_in_batch: bool = True  # False: each micro-batch's mean loss / grad_accum (the pre-4.46 Trainer)
    autocast: bool = True  # bf16/fp16 training dtype: forward under torch.autocast, as accelerate does
    outputs_to_fp32: bool = True  # under autocast: accelerate casts the forward's bf16/fp16 outputs to float32
    optimizer: str | None = None  # None: the scenario's train.optimizer
    attn_implementation: str | None = None  # None: the scenario's model.attn_implementation
    # the Trainer's bookkeeping inside each step (transformers 5.17 ``_inner_training_loop``), host work that runs
    # while the GPU waits when it follows a synchronisation:
    nan_inf_filter: bool = True  # TrainingArguments.logging_nan_inf_filter: `isnan(loss) or isinf(loss)` after
    #                              each micro-batch's backward, a device synchronisation
    count_flos: bool = True  # Trainer.floating_point_ops per micro-batch (stock: num_parameters walks the model)
    train_each_step: bool = True  # training_step calls model.train() (a walk over every module) each micro-batch
    clip_walks_parameters: bool = True  # the clip takes model.parameters() afresh each step (a walk of the model)
    # True: transformers' Trainer itself trains the loop's model (adapters_for_tools/hf/handloop.py), timed by a bare
    # callback: a difference between harness and loop then falls on the Trainer's side or on the harness's
    trainer: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The knobs as JSON values."""
        return dataclasses.asdict(self)


def parse_knobs(pairs: list[str]) -> HfKnobs:
    """``["attention_mask=false", "optimizer=adamw_torch"]`` as :class:`HfKnobs` over the defaults.

    Raises:
        ValueError: an unknown knob or a value that is not of the knob's kind.
    """
    names = {f.name: f for f in dataclasses.fields(HfKnobs)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"unknown hand-loop knob {pair!r} (KEY=VALUE, KEY one of {', '.join(names)})")
        if names[key].type in ("bool", bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"{key}: {raw!r} is not true or false")
            values[key] = raw.lower() == "true"
        else:
            values[key] = None if raw.lower() in ("", "none", "null") else raw
    return HfKnobs(**values)
