"""An Axolotl plugin that plugs the common measurement hook into Axolotl's own trainer.

Axolotl calls ``add_callbacks_post_trainer(cfg, trainer)`` on every plugin named in ``cfg.plugins`` right after
it builds the trainer and before training: the model there is final (PEFT-wrapped, quantised), so the counting
hook is attached to it and our ``TrainerCallback`` is returned, after the switch read-back
(:func:`adapters_for_tools.switches.read_back_callback`). The adapter sets :data:`CTX` and :data:`READ_BACK` before
training and adds this plugin to the in-process config only (the saved ``axolotl.yml`` reruns without tunebench).
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from adapters_for_tools.switches import read_back_callback

CTX = None  # the worker's RunContext, set by the adapter
READ_BACK = None  # model -> effective speed switches, set by the adapter
PLUGIN_NAME = "adapters_for_tools.axolotl.plugin.MeasurePlugin"


class MeasurePlugin(BasePlugin):
    """Attaches ``CTX.meter`` to the trainer's model and adds the measuring callback."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        ctx = CTX
        if ctx is None:
            return []
        ctx.meter.attach(trainer.model)
        # the switch read-back (before the step clock starts), the measuring callback, then the intermediate saves
        # of eval.every_steps (time-to-target), as for the other HF-Trainer-based tools
        first = [read_back_callback(ctx, READ_BACK)] if READ_BACK is not None else []
        return [*first, *ctx.trainer_callbacks()]
