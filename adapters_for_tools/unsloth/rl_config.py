"""A preference / RL objective as Unsloth's own calls (pure; no toolkit import), saved as ``unsloth_<kind>.json``.

Unsloth runs DPO, ORPO, KTO and GRPO as its guides and notebooks do: a model from ``FastLanguageModel`` (with
``get_peft_model`` for LoRA / QLoRA) handed to TRL's ``DPOTrainer``, ``ORPOTrainer``, ``KTOTrainer`` or
``GRPOTrainer``, which ``import unsloth`` has replaced with compiled subclasses of its own (``UnslothDPOTrainer``,
...: its log-prob and GRPO loss code, its patched configs; ORPO from ``trl.experimental.orpo``, where TRL 1.x keeps
it). The file holds:

- ``objective``: the kind; ``from_pretrained`` and ``get_peft_model``: as for SFT (``config.model_calls``);
- ``<kind>``: the keywords of the patched ``DPOConfig`` / ``ORPOConfig`` / ``KTOConfig`` / ``GRPOConfig``: what
  every objective trainer gets (``config.training_args``: the scenario's optimisation settings, given explicitly
  because Unsloth's configs change TRL's defaults), the rows in file order, ``max_length = seq_len``, and the
  objective's settings one to one (``harness.spec.objective``: ``beta``, ``loss_type``, KTO's weights as TRL's
  adapter writes them, ``objective_meter.preference_config``; GRPO's ``num_generations``,
  ``max_completion_length`` = ``max_new_tokens``, ``temperature``);
- ``reward_funcs`` (grpo): dotted paths of the reward functions (``harness.inputs.preference.REWARD_FUNCTIONS``);
- ``reference_copy``: whether the adapter loads a frozen copy of the starting model as DPO's or KTO's ``ref_model``;
- ``data_file``: the rows the trainer reads.

Reference (``objective.reference``): ``adapter_disabled`` is Unsloth's recipe with a LoRA policy (``ref_model=None``:
TRL switches the adapters off for the reference pass); ``copy`` beside a LoRA policy is a second
``FastLanguageModel.from_pretrained`` with the policy's arguments (DPO, KTO; GRPO's trainer takes no reference model);
``copy`` with full fine-tuning is loaded by TRL's trainer itself, in the scenario's dtype (``model_init_kwargs``);
``precomputed`` is ``precompute_ref_log_probs``.

GRPO settings that Unsloth's config resolves differently from TRL unless given (its ``loss_type="dapo"`` also sets
``mask_truncated_completions`` and ``epsilon_high=0.28``; its ``dr_grpo`` turns reward scaling off) are given as TRL
has them, so every framework optimises the same loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools.objective_meter import grpo_reference_unhonoured, loads_reference_copy, preference_config
from adapters_for_tools.unsloth import config as us_config
from harness.inputs.preference import REWARD_FUNCTIONS

KINDS = ("dpo", "orpo", "kto", "grpo")  # besides sft: the objectives of Unsloth's guides this adapter runs
GRPO_EPSILON = 0.2  # TRL's GRPOConfig.epsilon, which its epsilon_high falls back to: the clipping TRL's runs use


def native_config(sc, work_dir: Path, checkpoint: str, data_file: Path,
                  use_gradient_checkpointing: bool | str | None = None) -> dict[str, Any]:
    """Unsloth call arguments for the scenario's objective (``sc.objective.kind`` in :data:`KINDS`).

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (trainer output goes under it).
        checkpoint: model directory every framework loads.
        data_file: the JSONL the trainer reads (``harness.inputs.preference.objective_rows``).
        use_gradient_checkpointing: the row's override, as for ``config.native_config``.

    Returns:
        ``{"objective", "from_pretrained", "get_peft_model", <kind>, "reference_copy", "data_file"}`` (and
        ``"reward_funcs"`` for grpo), JSON-serialisable.
    """
    ob = sc.objective
    kind = ob.kind
    fp, peft = us_config.model_calls(sc, checkpoint, use_gradient_checkpointing)
    args: dict[str, Any] = {**us_config.training_args(sc, work_dir), "disable_tqdm": True, "beta": ob.beta}
    if kind == "grpo":
        args.update({"shuffle_dataset": False,  # TRL's sampler in file order, as every framework reads the rows
                     "loss_type": ob.loss_type, "num_generations": ob.num_generations,
                     "max_completion_length": ob.max_new_tokens, "temperature": ob.temperature,
                     "log_completions": False, "mask_truncated_completions": False,
                     "epsilon": GRPO_EPSILON, "epsilon_high": GRPO_EPSILON})
        if ob.loss_type == "dr_grpo":
            args["scale_rewards"] = None  # Unsloth's way to keep TRL's group scaling (it turns False on for dr_grpo)
    else:
        args.update({"train_sampling_strategy": "sequential", "max_length": sc.data.seq_len, "dataset_num_proc": 1})
    args.update(preference_config(sc))
    reference = ob.reference_for(sc.method.is_peft)
    if kind in ("dpo", "kto", "grpo") and reference == "copy" and not sc.method.is_peft:
        # TRL's trainer loads the copy itself from these (float32 otherwise)
        args["model_init_kwargs"] = {"dtype": sc.model.dtype, "attn_implementation": sc.model.attn_implementation}
    cfg: dict[str, Any] = {"objective": kind, "from_pretrained": fp, "get_peft_model": peft, kind: args,
                           "reference_copy": loads_reference_copy(sc), "data_file": str(data_file)}
    if kind == "grpo":
        cfg["reward_funcs"] = [REWARD_FUNCTIONS[ob.reward]]
    return cfg


def cannot_honour(sc) -> list[tuple[str, str]]:
    """Scenario settings Unsloth cannot reproduce exactly for the objective: (setting, why)."""
    return us_config.cannot_honour(sc) + grpo_reference_unhonoured(sc)
