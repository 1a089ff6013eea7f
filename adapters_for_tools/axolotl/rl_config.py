"""A preference objective as Axolotl's own ``rl:`` configuration (pure; no toolkit import).

Axolotl 0.19 runs DPO, ORPO and KTO on TRL's trainers (``AxolotlDPOTrainer``, ``AxolotlORPOTrainer``,
``AxolotlKTOTrainer``) and builds them from its YAML: ``rl: dpo|orpo|kto``, ``rl_beta``, ``dpo_loss_type``,
``precompute_ref_log_probs`` (DPO), ``kto_desirable_weight`` / ``kto_undesirable_weight``. Everything else (model,
LoRA, precision, optimiser, checkpointing) is the SFT config's (``config.native_config``), less its SFT data keys.

Data: the sweep's rows as plain text, no chat template (the scenario's tokenizer has none), written to
``axolotl_<kind>_dataset.jsonl`` beside the YAML. DPO and KTO read them through Axolotl's ``user_defined.default``
types (``field_prompt`` / ``field_chosen`` / ``field_rejected``, KTO's ``field_completion`` / ``field_label``, every
format ``{field}`` alone: the text unchanged). ORPO's own types are chat templates only, so its entry has no
``type``: Axolotl then hands the prompt/chosen/rejected rows to TRL as they are. TRL tokenises each sequence as
``<bos> + prompt + completion + <eos>`` (the trl adapter's ids), cut at ``max_length`` = ``sequence_len``.
``excess_length_strategy: truncate`` makes Axolotl shorten a completion too long for ``sequence_len`` instead of
dropping its row, which leaves the ids TRL's own cut gives (a prompt that alone fills ``sequence_len`` is still
dropped; validation says so, ``harness.inputs.preference.check_file``).

Order: Axolotl's DPO and ORPO trainers take transformers' random sampler (``train_sampling_strategy``; its SFT key
``curriculum_sampling`` does not reach them, and its YAML has no other), so the YAML lists :data:`ORDER_PLUGIN`, an
Axolotl plugin that sets ``train_sampling_strategy: sequential``: file order, as every framework reads the rows
(KTO's trainer is sequential already).

Reference: with adapters, the policy with its adapters disabled (TRL's way: Axolotl hands its DPO and KTO trainers
the base model and the LoRA config); in full fine-tuning Axolotl loads a second copy for DPO. What Axolotl cannot
express is refused at validation (``rl_refusal`` in the package's ``__init__``): a reference copy beside adapters
(its docs name ``rl_adapter_ref_model``, but 0.19's config schema drops the key, so no copy is ever loaded), KTO's
``apo_zero_unpaired`` loss, and a KTO reference other than the disabled adapters. GRPO is not declared at all (the
adapter's ``INFO``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools.axolotl import config as ax_config

ORDER_PLUGIN = "adapters_for_tools.axolotl.order_plugin.FileOrderPlugin"
# keys of the SFT config that only Axolotl's SFT path reads (packing, prompt masking, its SFT sampler)
SFT_ONLY = ("sample_packing", "pad_to_sequence_len", "train_on_inputs", "curriculum_sampling")


def native_config(sc, work_dir: Path, checkpoint: str, data_file: Path,
                  layer_class: str | None = None) -> dict[str, Any]:
    """Axolotl config mapping for the scenario's objective (``sc.objective.kind`` dpo, orpo or kto).

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (outputs and the prepared-dataset cache go under it).
        checkpoint: model directory every framework loads.
        data_file: the rows Axolotl reads (:func:`harness.inputs.preference.objective_rows`, written by the adapter).
        layer_class: the checkpoint's decoder layer class, FSDP's wrapping unit (multi-GPU ``fsdp`` only).

    Returns:
        The config as a plain dict (YAML-serialisable).
    """
    ob = sc.objective
    cfg = ax_config.native_config(sc, work_dir, checkpoint, data_file, "text", layer_class=layer_class)
    for key in SFT_ONLY:
        del cfg[key]
    cfg.update({
        "rl": ob.kind,
        "rl_beta": ob.beta,  # the trainer's beta: DPO's and KTO's, ORPO's lambda
        "datasets": [dataset_entry(ob.kind, data_file)],
        "excess_length_strategy": "truncate",
        "remove_unused_columns": False,  # KTO needs its label column (Axolotl refuses KTO without this)
        "plugins": [ORDER_PLUGIN],
    })
    if ob.kind == "dpo":
        cfg.update({"dpo_loss_type": [ob.loss_type], "precompute_ref_log_probs": ob.reference == "precomputed"})
    if ob.kind == "kto":
        cfg.update({"kto_desirable_weight": ob.desirable_weight, "kto_undesirable_weight": ob.undesirable_weight})
    return cfg


def dataset_entry(kind: str, data_file: Path) -> dict[str, Any]:
    """The ``datasets:`` entry that reads the rows of :func:`harness.inputs.preference.objective_rows` as plain text
    (the module docstring says why)."""
    entry: dict[str, Any] = {"path": str(data_file), "split": "train"}
    if kind == "dpo":
        entry["type"] = {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected",
                         "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}
    elif kind == "kto":
        entry["type"] = {"field_prompt": "prompt", "field_completion": "completion", "field_label": "label",
                         "prompt_format": "{prompt}", "completion_format": "{completion}"}
    return entry


def differences(sc) -> list[str]:
    """How Axolotl runs the objective differently from the other tools, in ways the settings do not show."""
    ob = sc.objective
    if ob.kind == "dpo" and ob.reference == "precomputed" and not sc.method.is_peft:
        return ["reference: Axolotl loads a reference copy for full fine-tuning even when its log-probs are "
                "precomputed, and TRL keeps it in memory while training"]
    return []
