"""An Axolotl plugin that plugs the common measurement hook into Axolotl's own trainer.

Axolotl calls ``add_callbacks_post_trainer(cfg, trainer)`` on every plugin named in ``cfg.plugins`` right after
it builds the trainer and before training: the model there is final (PEFT-wrapped, quantised), so the counting
hook is attached to it and our ``TrainerCallback`` is returned, after the switch read-back
(:func:`adapters_for_tools.switches.read_back_callback`). The adapter sets :data:`CTX` and :data:`READ_BACK` before
training and adds this plugin to the in-process config only (the saved ``axolotl.yml`` reruns without it).

A preference run (``rl:``) trains on TRL's trainers, and Axolotl builds them: the adapter also sets
:data:`OBJECTIVE`, and the trainer is measured as the trl adapter measures its own
(:mod:`adapters_for_tools.objective_meter`): its forwards counted by the objective meter (the trained ones into
the common meter, the reference pass apart), its objective settings read back from the live trainer.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from adapters_for_tools.objective_meter import read_back
from adapters_for_tools.switches import read_back_callback

CTX = None  # the worker's RunContext, set by the adapter
READ_BACK = None  # model -> effective speed switches, set by the adapter
OBJECTIVE = None  # the ObjectiveMeter of a dpo/orpo/kto run, set by the adapter (None: sft)
TRAINER = None  # the trainer Axolotl built, kept here for what the adapter reads from it after training
PLUGIN_NAME = "adapters_for_tools.axolotl.plugin.MeasurePlugin"


class MeasurePlugin(BasePlugin):
    """Attaches ``CTX.meter`` (or :data:`OBJECTIVE`) to the trainer's model and adds the measuring callbacks."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        global TRAINER
        ctx = CTX
        if ctx is None:
            return []
        TRAINER = trainer
        # the switch read-back (before the step clock starts), the measuring callback, then the intermediate saves
        # of eval.every_steps (time-to-target), as for the other HF-Trainer-based tools
        first = [read_back_callback(ctx, READ_BACK)] if READ_BACK is not None else []
        om = OBJECTIVE
        if om is None:
            ctx.meter.attach(trainer.model)
            return [*first, *ctx.trainer_callbacks()]
        kind = ctx.scenario.objective.kind
        om.attach(trainer, kind)  # counts into ctx.meter itself: the model gets no second counting hook
        ctx.set_effective(**read_back(trainer, kind))
        ctx.extra["train_sampling_strategy"] = trainer.args.train_sampling_strategy  # the order plugin's doing
        return [*first, *ctx.trainer_callbacks(), om.callback()]  # after the measuring one: its clock stops first
