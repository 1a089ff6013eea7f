"""The objective trainers' meter, shared by every tool whose preference and RL training runs on TRL's trainers
(TRL itself; Unsloth, Axolotl and LLaMA-Factory build on them): effective settings read back from the live trainer,
and the forwards counted the same way for all of them.

What is counted (:class:`ObjectiveMeter`), the same way for every objective:

- tokens/s: every token of the forwards that train (gradient on): ``prompt + chosen`` and ``prompt + rejected`` for
  DPO and ORPO (one forward holds both: ``2 x micro_batch`` rows), each labelled completion for KTO, ``prompt +
  completion`` of each sampled completion for GRPO (loss-bearing: the completion's tokens). The forwards without
  gradient — the reference pass (DPO, KTO, GRPO with ``beta > 0``; a precomputed one runs inside the trainer's
  constructor, before the first step: counted and timed there, ``precompute_s``),
  KTO's KL estimate, GRPO's log-probs of the sampling policy — are counted apart, in ``extra["reference_pass"]``;
  GRPO's sampling is timed apart, in ``extra["generation"]``.
- ``micro_batch`` is read back in the scenario's units (pairs for DPO and ORPO), the objective's settings from the
  live trainer (``beta``, ``loss_type``, ``reference``: whether a reference model exists, is precomputed, or is the
  policy with its adapters disabled; GRPO's ``num_generations``, ``max_new_tokens``, ``temperature``, ``reward``).
- GRPO, per step: the time spent sampling (the device synchronised around TRL's generation call) and the tokens
  sampled; training time = step time - sampling time; the mean reward of the step's completions (TRL's ``reward``
  log): ``extra["generation"]``, ``extra["reward_curve"]``. DPO, ORPO, KTO: TRL's per-step reward statistics of the
  training batches (``rewards/accuracies``, ``rewards/margins``) in ``extra["train_rewards"]``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

from harness.inputs.preference import REWARD_FUNCTIONS

# TRL's per-step logs kept with the run (name in extra -> TRL's key)
REWARD_LOGS = {"accuracy": "rewards/accuracies", "margin": "rewards/margins", "chosen": "rewards/chosen",
               "rejected": "rewards/rejected"}
GRPO_LOGS = {"reward": "reward", "reward_std": "reward_std", "completion_mean_tokens": "completions/mean_length"}


def preference_config(sc) -> dict[str, Any]:  # noqa: ANN001
    """The objective's own keys of TRL's ``DPOConfig`` / ``KTOConfig`` (and of the copies Unsloth patches), the
    same for every tool that builds one: no padding to a multiple, a precomputed reference where the scenario asks
    for one, the loss and (DPO) truncation from the start, KTO's weights. Empty for the other objectives."""
    ob = sc.objective
    if ob.kind not in ("dpo", "kto"):
        return {}
    out: dict[str, Any] = {"pad_to_multiple_of": None, "precompute_ref_log_probs": ob.reference == "precomputed"}
    if ob.kind == "dpo":
        return out | {"loss_type": [ob.loss_type], "truncation_mode": "keep_start"}
    return out | {"loss_type": ob.loss_type, "desirable_weight": ob.desirable_weight,
                  "undesirable_weight": ob.undesirable_weight}


def loads_reference_copy(sc) -> bool:  # noqa: ANN001
    """Whether the adapter loads DPO's or KTO's reference copy itself and hands it over as ``ref_model``: a copy
    asked beside a PEFT policy, where TRL's trainer would disable the adapters instead (for full fine-tuning the
    trainer loads the copy itself, from ``model_init_kwargs``)."""
    ob = sc.objective
    return ob.kind in ("dpo", "kto") and sc.method.is_peft and ob.reference == "copy"


def grpo_reference_unhonoured(sc) -> list[tuple[str, str]]:  # noqa: ANN001
    """A reference copy asked beside a PEFT policy in GRPO, which TRL's GRPOTrainer (and the trainers built on it)
    cannot take: ``[(setting, why)]`` for ``RunContext.cannot_honour``, or ``[]``."""
    ob = sc.objective
    if ob.kind == "grpo" and sc.method.is_peft and ob.reference == "copy":
        return [("objective.reference", "TRL's GRPOTrainer takes no reference model: with a PEFT policy it "
                 "disables the adapters (reference adapter_disabled)")]
    return []


def read_back(trainer, kind: str) -> dict[str, Any]:  # noqa: ANN001
    """The objective's settings from the live trainer, in ``ObjectiveSpec.expected``'s keys."""
    from accelerate.utils import is_peft_model

    out: dict[str, Any] = {"objective": kind, "beta": float(trainer.beta)}
    if kind == "dpo":
        losses = list(trainer.loss_types)
        out["loss_type"] = losses[0] if len(losses) == 1 else losses
    elif kind in ("kto", "grpo"):
        out["loss_type"] = trainer.loss_type
    if kind == "kto":
        out["desirable_weight"] = float(trainer.desirable_weight)
        out["undesirable_weight"] = float(trainer.undesirable_weight)
    if kind == "grpo":
        paths = {v: k for k, v in REWARD_FUNCTIONS.items()}
        names = [paths.get(f"{f.__module__}.{f.__qualname__}", getattr(f, "__name__", str(f)))
                 for f in trainer.reward_funcs]
        out.update({"num_generations": int(trainer.num_generations),
                    "max_new_tokens": int(trainer.max_completion_length),
                    "temperature": float(trainer.temperature), "reward": names[0] if len(names) == 1 else names})
    ref = getattr(trainer, "ref_model", None)
    if kind == "orpo" or (kind == "grpo" and trainer.beta == 0):
        out["reference"] = "none" if ref is None else "copy"
    elif getattr(trainer, "precompute_ref_logps", False):
        out["reference"] = "precomputed"
    elif ref is not None:
        out["reference"] = "copy"
    elif is_peft_model(trainer.model):
        out["reference"] = peft_reference(trainer.model)
    else:
        out["reference"] = "none"
    return out


def peft_reference(model) -> str:  # noqa: ANN001
    """The reference of a PEFT policy without a reference model. TRL disables the policy's adapters, unless the
    policy arrives already wrapped (Unsloth's recipe: its own ``get_peft_model`` first): then TRL adds a frozen
    "ref" adapter, a copy of the policy's. A copy of an adapter that has not trained (every ``lora_B`` zero) leaves
    the base model as it is, the reference that disabled adapters give: ``ref_adapter_untrained``; any other copy
    is ``ref_adapter``. Read before training."""
    if "ref" not in model.peft_config:
        return "adapter_disabled"
    ref_b = [p for n, p in model.named_parameters() if ".lora_B.ref." in n]
    return "ref_adapter_untrained" if ref_b and not any(bool(p.detach().any()) for p in ref_b) else "ref_adapter"


class ObjectiveMeter:
    """Counts an objective trainer's forwards (the module docstring): those with gradient go to the common meter,
    those without to a tally of their own; GRPO's sampling is timed; TRL's reward logs are kept per step."""

    def __init__(self, meter, device: str):  # noqa: ANN001
        self.meter = meter
        self.device = device
        self.in_step = False
        self.generating = False
        self.in_counted_loss = False  # inside a compute_loss whose inputs count_loss_inputs counted
        self.pending_labels = None  # expect_labels: the next training forward's labels, popped before it runs
        self.nograd_step = 0
        self.nograd_before = 0  # before the first step: a precomputed reference
        self.nograd_forwards = 0
        self.nograd_per_step: list[int] = []
        self.gen_s = 0.0
        self.gen_tokens = 0
        self.gen_completions = 0
        self.generation: list[dict[str, Any]] = []
        self.logs: dict[int, dict[str, float]] = {}
        self.max_rows = 0
        self.precompute_s = 0.0

    @contextlib.contextmanager
    def precompute_counted(self, cls: type) -> Iterator[None]:
        """While ``cls`` is constructed, count and time its precomputed reference pass (``_precompute_ref_logps``,
        which TRL runs inside the constructor, before our hooks could be attached to the models it loads)."""
        original = cls.__dict__.get("_precompute_ref_logps")
        if original is None:
            yield
            return
        om = self

        def counted(trainer, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN001
            models = [m for m in (trainer.model, getattr(trainer, "ref_model", None)) if m is not None]
            handles = [m.register_forward_pre_hook(om._reference_hook, with_kwargs=True) for m in models]
            om._sync()
            t0 = time.perf_counter()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                om._sync()
                om.precompute_s += time.perf_counter() - t0
                for h in handles:
                    h.remove()

        cls._precompute_ref_logps = counted
        try:
            yield
        finally:
            cls._precompute_ref_logps = original

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def attach(self, trainer, kind: str) -> None:  # noqa: ANN001
        """Hook the policy (and a reference copy); wrap GRPO's generation call."""
        trainer.model.register_forward_pre_hook(self._policy_hook, with_kwargs=True)
        if (ref := getattr(trainer, "ref_model", None)) is not None:
            ref.register_forward_pre_hook(self._reference_hook, with_kwargs=True)
        if kind == "grpo":
            generate = trainer._generate_single_turn

            def timed(*args: Any, **kwargs: Any) -> Any:
                self._sync()
                t0 = time.perf_counter()
                self.generating = True
                try:
                    completion_ids, logprobs = generate(*args, **kwargs)
                finally:
                    self.generating = False
                self._sync()
                self.gen_s += time.perf_counter() - t0
                self.gen_tokens += sum(len(c) for c in completion_ids)
                self.gen_completions += len(completion_ids)
                return completion_ids, logprobs

            trainer._generate_single_turn = timed

    def count_loss_inputs(self, trainer) -> None:  # noqa: ANN001
        """GRPO: count each training micro-batch from the inputs ``compute_loss`` gets, not from the policy's forwards.

        For a trainer whose training forward is not one padded batch of the micro-batch's completions (Unsloth packs
        them into one row, shares each prompt among its group, and checks its packing with forwards of its own). The
        figures are those the policy hook takes from TRL's forward: one row per completion, its prompt and
        completion tokens, the completion's tokens as loss tokens. Forwards inside ``compute_loss`` are then not
        counted; those without gradient outside it (reference and sampling-policy log-probs) still are.
        """
        import torch  # heavy: inside the worker only

        compute_loss = trainer.compute_loss
        om = self

        def counted(model, inputs, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN001
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : inputs["prompt_ids"].shape[1]] = -100
            if om.meter.first_forward_training is None:
                om.meter.first_forward_training = bool(model.training)
            om.meter.count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
            om.max_rows = max(om.max_rows, int(ids.shape[0]))
            om.in_counted_loss = True
            try:
                return compute_loss(model, inputs, *args, **kwargs)
            finally:
                om.in_counted_loss = False

        trainer.compute_loss = counted

    def expect_labels(self, labels) -> None:  # noqa: ANN001
        """The labels of the training forward about to run, for a trainer that pops them before the policy's
        forward (LLaMA-Factory takes the log-probs from the logits): its loss-bearing tokens are counted from them,
        as TRL's are from the labels its forward gets. None: count the forward without."""
        self.pending_labels = labels

    @staticmethod
    def _batch(args: tuple, kwargs: dict) -> dict[str, Any] | None:
        batch = dict(kwargs)
        if "input_ids" not in batch and args:
            batch["input_ids"] = args[0]
        return batch if batch.get("input_ids") is not None else None

    def _policy_hook(self, module, args, kwargs) -> None:  # noqa: ANN001
        import torch

        if self.generating or self.in_counted_loss:
            return  # sampling: timed and counted as generated tokens; a counted loss: counted from its inputs
        batch = self._batch(args, kwargs)
        labels, self.pending_labels = self.pending_labels, None
        if batch is None:
            return
        if labels is not None and batch.get("labels") is None:
            batch["labels"] = labels  # _batch's copy: the model's own arguments stay as they are
        if not torch.is_grad_enabled():
            self._nograd(batch)
            return
        if self.meter.first_forward_training is None:
            self.meter.first_forward_training = bool(module.training)
        keep = batch.get("logits_to_keep")
        if isinstance(keep, int) and keep > 0 and batch.get("labels") is None:
            # GRPO scores only the last logits_to_keep positions (the completion): those are its loss tokens
            labels = batch["input_ids"].clone()
            labels[:, : labels.shape[1] - keep] = -100
            if batch.get("attention_mask") is not None:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        self.meter.count_batch(batch)
        self.max_rows = max(self.max_rows, int(batch["input_ids"].shape[0]))

    def _reference_hook(self, module, args, kwargs) -> None:  # noqa: ANN001
        if (batch := self._batch(args, kwargs)) is not None:
            self._nograd(batch)

    def _nograd(self, batch: dict[str, Any]) -> None:
        mask = batch.get("attention_mask")
        n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.nograd_forwards += 1
        if self.in_step:
            self.nograd_step += n
        else:
            self.nograd_before += n

    def callback(self) -> Any:
        """The ``TrainerCallback`` that closes each step's tallies and keeps TRL's reward logs."""
        from transformers import TrainerCallback

        om = self

        class ObjectiveCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
                om.in_step = True

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
                om.in_step = False
                om.nograd_per_step.append(om.nograd_step)
                om.generation.append({"step": state.global_step, "generation_s": om.gen_s,
                                      "generated_tokens": om.gen_tokens, "completions": om.gen_completions})
                om.nograd_step, om.gen_s, om.gen_tokens, om.gen_completions = 0, 0.0, 0, 0

            def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003, ANN202
                kept = {k: float(logs[v]) for k, v in {**REWARD_LOGS, **GRPO_LOGS}.items()
                        if logs and isinstance(logs.get(v), int | float)}
                if kept:
                    om.logs.setdefault(state.global_step, {}).update(kept)

        return ObjectiveCallback()

    def batch_effective(self, kind: str) -> dict[str, Any]:
        """``micro_batch`` in the scenario's units: DPO and ORPO forwards hold chosen and rejected rows."""
        if not self.max_rows:
            return {}
        return {"micro_batch": self.max_rows // 2 if kind in ("dpo", "orpo") else self.max_rows}

    def extra(self, kind: str) -> dict[str, Any]:
        """What the run stores beside the common metrics (the module docstring)."""
        steps = self.meter.steps
        out: dict[str, Any] = {}
        if self.nograd_forwards:
            per_step = self.nograd_per_step[: len(steps)]
            out["reference_pass"] = {
                "what": "forwards without gradient (reference log-probs; KTO's KL estimate; GRPO's sampling-policy "
                        "log-probs): not in tokens/s",
                "tokens_per_step_mean": statistics.fmean(per_step) if per_step else None,
                "tokens_before_training": self.nograd_before, "forwards": self.nograd_forwards}
            if self.precompute_s:
                out["reference_pass"]["precompute_s"] = self.precompute_s  # inside load_s, before the first step
        if kind == "grpo":
            out["generation"] = _generation_summary(steps, self.generation)
            out["reward_curve"] = [{"step": s, **v} for s, v in sorted(self.logs.items())
                                   if "reward" in v]
        else:
            out["train_rewards"] = [{"step": s, **v} for s, v in sorted(self.logs.items())]
        return out


def _generation_summary(steps: list[dict[str, Any]], generation: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO's sampling against training, over the measured steps: medians per step and rates."""
    rows = []
    for s, g in zip(steps, generation, strict=False):
        rows.append({**g, "step_s": s["step_s"], "training_s": max(0.0, s["step_s"] - g["generation_s"]),
                     "measured": s["measured"]})
    measured = [r for r in rows if r["measured"]]
    gen_s = sum(r["generation_s"] for r in measured)
    total_s = sum(r["step_s"] for r in measured)
    return {
        "per_step": rows,
        "generation_s_median": statistics.median([r["generation_s"] for r in measured]) if measured else None,
        "training_s_median": statistics.median([r["training_s"] for r in measured]) if measured else None,
        "generation_fraction": gen_s / total_s if total_s > 0 else None,
        "generated_tokens_per_s": sum(r["generated_tokens"] for r in measured) / gen_s if gen_s > 0 else None,
        "completions_per_s": sum(r["completions"] for r in measured) / total_s if total_s > 0 else None,
    }
