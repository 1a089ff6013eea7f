"""The hf hand loop's bisecting step: the loop's model trained by transformers' own ``Trainer`` at the hf adapter's
``TrainingArguments``, with none of the harness around it: no worker, no ``StepMeter``, no harness callback.

The hf loop runs this with its ``trainer=true`` knob (:class:`~harness.measuring.handloop.knobs.HfKnobs`). Beside
the plain loop (the Trainer's step written out) and the harness's hf row (the Trainer under the harness), it tells
which of the two a difference between them sits in. It lives beside the adapter to take the ``TrainingArguments``
from the adapter's own function; the measuring layer loads it by name.

A bare ``TrainerCallback`` times each optimizer step as the loop's clock does (device synchronised at both ends,
CUDA events), from the Trainer's step begin to its step end; a forward pre-hook keeps references to what the model
is fed (no device read inside the step), counted once the step's clock has stopped; the losses are the Trainer's
logged ones (``logging_steps=1``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_for_tools.hf import HfOverrides
from adapters_for_tools.hf.config import training_args
from harness.inputs import data
from harness.measuring.handloop.common import StepClock, StepLog
from harness.measuring.handloop.knobs import HfKnobs

FED_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
TIMING = ("device synchronised; from the Trainer's on_step_begin to its on_step_end (a bare callback); the step's "
          "micro-batches as the Trainer's data loader fetches them before it begins the step")


def train_with_trainer(model, tok, sc, device: str, rows: list[dict], steps: int,  # noqa: ANN001
                       knobs: HfKnobs, read_back: Callable[[Any, Any], dict[str, Any]]) -> tuple[StepLog, dict]:
    """Train ``model`` on the sweep's tokenised ``rows`` with ``transformers.Trainer`` for ``steps`` steps.

    Returns:
        ``(log, settings)`` as :func:`harness.measuring.handloop.trainer_loop.train` returns them: each step's time,
        fed micro-batches and logged loss; the settings read back at the first step, plus the Trainer's own.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments  # heavy (transformers)

    fed: list[dict] = []
    settings: dict[str, Any] = {}
    logged: dict[int, float] = {}
    log, clock = StepLog(), StepClock(device)

    def keep_fed(module, args, kwargs):  # noqa: ANN001, ANN202
        if module.training:
            fed.append({k: kwargs[k] for k in FED_KEYS if kwargs.get(k) is not None})

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
            if not settings:
                settings.update(read_back(kw.get("model"), kw.get("optimizer")))
            fed.clear()
            clock.begin()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
            step_s = clock.end()
            log.add(step_s, list(fed), math.nan)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003, ANN202
            if logs and "loss" in logs:
                logged[state.global_step] = float(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="hf-trainer-loop-") as work:
        args = TrainingArguments(**training_args(sc, Path(work), HfOverrides())
                                 | {"max_steps": steps, "logging_nan_inf_filter": knobs.nan_inf_filter})
        handle = model.register_forward_pre_hook(keep_fed, with_kwargs=True)
        try:
            Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()],
                    data_collator=lambda feats: data.collate(feats, tok.pad_token_id)).train()
        finally:
            handle.remove()
    log.losses = [logged.get(i + 1, math.nan) for i in range(len(log.step_s))]
    return log, settings | {"trainer": "transformers.Trainer", "attention_mask_fed": True,
                            "logging_nan_inf_filter": bool(args.logging_nan_inf_filter), "timing": TIMING}
