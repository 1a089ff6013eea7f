"""LLaMA-Factory's preference stages in the worker: its live trainer found, its forwards counted, its settings read
back.

``run_exp`` builds the trainer inside (``CustomDPOTrainer`` for DPO and ORPO, ``CustomKTOTrainer`` for KTO, both
subclasses of TRL 0.24's trainers). :func:`built` records the instance as it is constructed; at ``on_train_begin``,
before the first forward, :func:`objective_callbacks` hooks it with the shared
:class:`~adapters_for_tools.objective_meter.ObjectiveMeter` (forwards with gradient in tokens/s, the reference pass
and KTO's KL estimate apart, TRL's reward logs per step) and reads its settings back (:func:`read_back`).
LLaMA-Factory pops the labels before the policy's forward (it takes the log-probs from the logits), so the meter is
handed each training forward's labels beforehand (``ObjectiveMeter.expect_labels``): its loss-bearing tokens are
counted from them, as TRL's are from the labels its forward gets.

The read-back is LLaMA-Factory's own rather than ``objective_meter.read_back``: its DPO trainer keeps one
``loss_type`` string (not TRL 1.x's ``loss_types``), and that string is not the loss that runs (the ``dpo_loss`` it
calls takes the loss type as an argument it never passes). So the DPO loss is read by running the live trainer's
own ``compute_preference_loss`` on probe log-probabilities and matching the result against each loss's formula
(:func:`probe_dpo_loss`); the reference from what LLaMA-Factory's ``compute_reference_log_probs`` uses (a reference
model, or the policy with its adapters disabled, or none when ``use_ref_model`` is off: ORPO).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

from adapters_for_tools.objective_meter import ObjectiveMeter

# probe log-probabilities (policy chosen, policy rejected, reference chosen, reference rejected): margins
# (chosen - ref) - (rejected - ref) of 1.5 and -0.5, where sigmoid, hinge and IPO differ for every beta of interest
PROBES = ((-1.0, -2.0, -1.5, -1.0), (-2.0, -1.0, -1.5, -1.0))


def trainer_class(kind: str) -> type:
    """The LLaMA-Factory trainer class ``run_exp`` builds for objective ``kind``."""
    if kind == "kto":
        from llamafactory.train.kto.trainer import CustomKTOTrainer  # the toolkit: the worker's environment only

        return CustomKTOTrainer
    from llamafactory.train.dpo.trainer import CustomDPOTrainer  # the toolkit: the worker's environment only

    return CustomDPOTrainer


@contextlib.contextmanager
def built(cls: type) -> Iterator[list[Any]]:
    """While open, each instance of ``cls`` constructed is appended to the yielded list (``run_exp`` builds the
    trainer where no caller can reach it; the callbacks it gets do not receive it)."""
    made: list[Any] = []
    original = cls.__init__

    def init(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN001
        original(self, *args, **kwargs)
        made.append(self)

    cls.__init__ = init
    try:
        yield made
    finally:
        cls.__init__ = original


def live_kind(trainer) -> str:  # noqa: ANN001
    """The objective the live trainer trains: ``kto`` for the KTO trainer; ``orpo`` (or ``simpo``) for the DPO
    trainer with that reference-free ``pref_loss``, else ``dpo``."""
    if hasattr(trainer, "desirable_weight"):
        return "kto"
    return trainer.loss_type if trainer.loss_type in ("orpo", "simpo") else "dpo"


def reference(trainer, kind: str) -> str:  # noqa: ANN001
    """Where the live trainer's reference log-probs come from, as LLaMA-Factory's ``compute_reference_log_probs``
    decides: none without ``use_ref_model`` (DPO trainer only; KTO always uses one), a reference model when it has
    one, else the policy with its adapters disabled."""
    if kind != "kto" and not trainer.finetuning_args.use_ref_model:
        return "none"
    if getattr(trainer, "precompute_ref_log_probs", False):
        return "precomputed"
    return "copy" if trainer.ref_model is not None else "adapter_disabled"


def probe_dpo_loss(trainer) -> str:  # noqa: ANN001
    """The DPO loss the live trainer computes: its ``compute_preference_loss`` on :data:`PROBES`, matched against
    the sigmoid, hinge and IPO formulas with its ``beta``; ``"unrecognised (...)"`` when none matches."""
    import torch  # heavy: the worker's environment only

    beta = float(trainer.beta)
    got, margins = [], []
    for c, r, rc, rr in PROBES:
        losses, _, _ = trainer.compute_preference_loss(*(torch.tensor([v]) for v in (c, r, rc, rr)))
        got.append(float(losses.float().mean()))
        margins.append((c - rc) - (r - rr))
    formulas = {"sigmoid": lambda z: math.log1p(math.exp(-beta * z)), "hinge": lambda z: max(0.0, 1 - beta * z),
                "ipo": lambda z: (z - 1 / (2 * beta)) ** 2}
    for name, f in formulas.items():
        if all(math.isclose(g, f(z), rel_tol=1e-4, abs_tol=1e-6) for g, z in zip(got, margins, strict=True)):
            return name
    return f"unrecognised (losses {', '.join(f'{g:.6g}' for g in got)} on the probe margins {margins})"


def read_back(trainer) -> dict[str, Any]:  # noqa: ANN001
    """The objective's settings from the live LLaMA-Factory trainer, in ``ObjectiveSpec.expected``'s keys."""
    kind = live_kind(trainer)
    out: dict[str, Any] = {"objective": kind, "beta": float(trainer.beta), "reference": reference(trainer, kind)}
    if kind == "dpo":
        loss = probe_dpo_loss(trainer)
        # a pref_loss that is not the loss computed (ipo: the sigmoid loss of per-token mean log-probs) is no DPO
        # loss of that name: said, so that it differs from the scenario's
        out["loss_type"] = loss if trainer.loss_type == loss else f"{loss} (pref_loss {trainer.loss_type!r})"
    if kind == "kto":
        out.update({"loss_type": trainer.loss_type, "desirable_weight": float(trainer.desirable_weight),
                    "undesirable_weight": float(trainer.undesirable_weight)})
    return out


def hand_over_labels(trainer, om: ObjectiveMeter) -> None:  # noqa: ANN001
    """Wrap the live trainer's forward helper (the DPO trainer's ``concatenated_forward``, the KTO trainer's
    ``forward``) so that each training call (gradient on; not the reference's, not KTO's KL estimate) hands its
    batch's labels to ``om`` before the policy runs."""
    import torch  # heavy: the worker's environment only

    if hasattr(trainer, "desirable_weight"):  # KTO: forward(model, batch, prefix); prefix "kl_" is the KL estimate
        forward = trainer.forward

        def kto_forward(model, batch, prefix: str = "") -> Any:  # noqa: ANN001
            if torch.is_grad_enabled() and not prefix:
                om.expect_labels(batch.get("labels"))
            return forward(model, batch, prefix=prefix)

        trainer.forward = kto_forward
        return
    concatenated = trainer.concatenated_forward

    def dpo_forward(model, batch, is_ref_model: bool = False) -> Any:  # noqa: ANN001
        if torch.is_grad_enabled() and not is_ref_model:
            om.expect_labels(batch.get("labels"))
        return concatenated(model, batch, is_ref_model=is_ref_model)

    trainer.concatenated_forward = dpo_forward


def objective_callbacks(ctx, kind: str, made: list[Any], t0: float) -> tuple[ObjectiveMeter, list[Any]]:  # noqa: ANN001
    """The meter of the objective's forwards and the callbacks ``run_exp`` gets for it (after the measuring ones:
    the step's clock stops first): at ``on_train_begin`` the trainer in ``made`` is hooked and read back, and the
    time since ``t0`` (model load, LLaMA-Factory's tokenisation) becomes ``ctx.load_s``."""
    from transformers import TrainerCallback  # heavy: the worker's environment only

    om = ObjectiveMeter(ctx.meter, ctx.scenario.hardware.device)

    class AttachObjective(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
            if not made:
                raise RuntimeError(f"LLaMA-Factory built no {kind} trainer the adapter could see")
            ctx.load_s = time.time() - t0
            om.attach(made[-1], kind)
            hand_over_labels(made[-1], om)
            ctx.set_effective(**read_back(made[-1]))

    return om, [AttachObjective(), om.callback()]
