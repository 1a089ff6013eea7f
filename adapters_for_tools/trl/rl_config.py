"""A preference / RL objective as TRL's own configuration: a YAML per trainer (pure; no toolkit import).

DPO, KTO and GRPO run as TRL's scripts run them, so ``python -m trl.scripts.<kind> --config trl_<kind>.yaml``
reruns the saved YAML with TRL alone: one flat mapping of the script's four argument groups (``ScriptArguments``,
GRPO's ``GRPOScriptArguments`` with ``reward_funcs``; ``DPOConfig`` / ``KTOConfig`` / ``GRPOConfig``;
``ModelConfig``; ``DatasetMixtureConfig``), which the adapter parses back with TRL's ``TrlParser``, so the file is
exactly what ran. TRL 1.16 keeps ``ORPOTrainer`` in ``trl.experimental`` without a script: its YAML has the same
groups around ``ORPOConfig`` and ``python -m adapters_for_tools.trl.rerun_orpo --config trl_orpo.yaml`` runs it
the way the other scripts run theirs.

What every trainer gets, as for SFT (``adapters_for_tools.trl.config``): the scenario's optimisation settings
(``contract.trainer_args``), the sweep's rows in file order (``train_sampling_strategy: sequential``; GRPO's own
sampler unshuffled), the seed, ``max_length = seq_len`` with ``keep_start`` truncation, logging every step.
The objective's settings map one to one (``harness.spec.objective``): ``beta``, ``loss_type``, KTO's weights,
GRPO's ``num_generations``, ``max_completion_length`` (= ``max_new_tokens``), ``temperature`` and
``reward_funcs`` (the dotted path of ``harness.inputs.preference.exact_match_reward``). Reference:
``precomputed`` is ``precompute_ref_log_probs``; ``adapter_disabled`` is TRL's own way with a PEFT model;
``copy`` with a PEFT model is a second model the adapter loads and hands over as ``ref_model`` (DPO, KTO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools.objective_meter import grpo_reference_unhonoured, preference_config
from adapters_for_tools.trl.config import method_args, script_args
from harness.inputs.preference import REWARD_FUNCTIONS

SCRIPTS = {"dpo": "trl.scripts.dpo", "kto": "trl.scripts.kto", "grpo": "trl.scripts.grpo",
           "orpo": "adapters_for_tools.trl.rerun_orpo"}  # what reruns trl_<kind>.yaml with TRL alone
CONFIG_CLASSES = {"dpo": "DPOConfig", "kto": "KTOConfig", "grpo": "GRPOConfig", "orpo": "ORPOConfig"}


def native_config(sc, work_dir: Path, checkpoint: str, data_file: Path) -> dict[str, Any]:  # noqa: ANN001
    """TRL script arguments for the scenario's objective (``sc.objective.kind`` not sft).

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (trainer output goes under it).
        checkpoint: model directory every framework loads.
        data_file: the JSONL TRL reads (rows of the objective's form, ``harness.inputs.preference``).

    Returns:
        A flat mapping of TRL CLI arguments (JSON/YAML-serialisable).
    """
    ob = sc.objective
    cfg: dict[str, Any] = {
        **script_args(sc, work_dir, checkpoint, data_file),
        "beta": ob.beta,
    }
    if ob.kind == "grpo":
        cfg.update({"shuffle_dataset": False,  # RepeatSampler in file order, as every framework reads the rows
                    "loss_type": ob.loss_type, "num_generations": ob.num_generations,
                    "max_completion_length": ob.max_new_tokens, "temperature": ob.temperature,
                    "reward_funcs": [REWARD_FUNCTIONS[ob.reward]], "log_completions": False})
    else:
        cfg.update({"train_sampling_strategy": "sequential", "max_length": sc.data.seq_len, "dataset_num_proc": 1})
    return cfg | preference_config(sc) | method_args(sc)


def cannot_honour(sc) -> list[tuple[str, str]]:  # noqa: ANN001
    """Scenario settings this TRL configuration cannot reproduce exactly: (setting, why)."""
    out = []
    if sc.method.kind == "qlora" and sc.method.quant.compute_dtype != sc.model.dtype:
        out.append(("method.quant.compute_dtype", f"TRL computes 4-bit layers in the model dtype "
                    f"({sc.model.dtype}), not {sc.method.quant.compute_dtype}"))
    out += grpo_reference_unhonoured(sc)
    return out
