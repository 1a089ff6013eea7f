"""The scenario as an Axolotl YAML config (pure; no toolkit import).

Data: the sweep's JSONL. ``text`` rows -> ``type: completion`` (tokenised ``<bos> + text``, ``<eos>`` appended:
the harness's ids); alpaca rows -> Axolotl's user-defined prompt format carrying the harness's own alpaca
template (``harness.inputs.data.ALPACA_PROMPT``), so prompts are the same text; messages and sharegpt conversations
-> Axolotl's custom pre-tokenised dataset (no ``type``; columns ``input_ids``, ``attention_mask``, ``labels``:
:func:`tokenised_rows`, the harness's ids and labels, every assistant turn trained). Its ``chat_template`` type would
render them with the tokenizer's own template, another text than every other tool trains on.
Order: ``curriculum_sampling: true`` gives Axolotl's sequential sampler (no shuffling) and
``shuffle_merged_datasets: false`` keeps the file order; with ``sample_packing`` Axolotl packs with its multipack
sampler (its own grouping; recorded as a difference by the adapter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import distributed
from adapters_for_tools.contract import HF_OPTIM
from harness.inputs.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, tokenize_example

LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
# the plugin's switches that apply to a Llama-family model (liger_layer_norm is for LayerNorm models)
LIGER_FLAGS = ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_fused_linear_cross_entropy")
LORA_KERNELS = {"lora_mlp_kernel": "mlp", "lora_o_kernel": "o", "lora_qkv_kernel": "qkv"}


def native_config(sc, work_dir: Path, checkpoint: str, dataset_path: Path, fmt: str,
                  liger: bool = False, layer_class: str | None = None) -> dict[str, Any]:
    """Axolotl config mapping for scenario ``sc`` (what ``axolotl.yml`` holds).

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (outputs and the prepared-dataset cache go under it).
        checkpoint: model directory every framework loads.
        dataset_path: the sweep's JSONL.
        fmt: its format (``text``, ``alpaca``, ``messages``, ``sharegpt``).
        liger: the row's ``liger`` override: Axolotl's Liger plugin with :data:`LIGER_FLAGS` on.
        layer_class: the checkpoint's decoder layer class, FSDP's wrapping unit (multi-GPU ``fsdp`` only).

    Returns:
        The config as a plain dict (YAML-serialisable).
    """

    work_dir = Path(work_dir)
    m, t = sc.method, sc.train
    if fmt == "text":
        ds = {"path": str(dataset_path), "ds_type": "json", "type": "completion", "field": "text"}
    elif fmt == "alpaca":
        ds = {"path": str(dataset_path), "ds_type": "json", "type": {
            "field_instruction": "instruction", "field_input": "input", "field_output": "output",
            "format": ALPACA_PROMPT,
            "no_input_format": ALPACA_PROMPT_NO_INPUT}}
    else:  # dataset_path holds tokenised_rows: Axolotl takes a dataset with those columns as it is
        ds = {"path": str(dataset_path), "ds_type": "json"}
    cfg: dict[str, Any] = {
        "base_model": str(checkpoint),
        "tokenizer_config": str(checkpoint),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [ds],
        "dataset_prepared_path": str(work_dir / "axolotl_prepared"),
        "shuffle_merged_datasets": False,
        "shuffle_before_merging_datasets": False,
        "curriculum_sampling": True,  # sequential sampler: the file's order
        "val_set_size": 0.0,
        "dataset_processes": 1,
        "sequence_len": sc.data.seq_len,
        "sample_packing": sc.data.packing,
        "pad_to_sequence_len": False,
        "train_on_inputs": sc.data.prompt_loss,
        "micro_batch_size": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "max_steps": t.steps,
        "num_epochs": 1,
        "learning_rate": t.lr,
        "lr_scheduler": t.lr_scheduler,
        "warmup_steps": 0,
        "optimizer": HF_OPTIM[t.optimizer],
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm or 0.0,
        "gradient_checkpointing": t.gradient_checkpointing,
        "bf16": sc.model.dtype == "bfloat16",
        "fp16": sc.model.dtype == "float16",
        "tf32": False,
        "attn_implementation": sc.model.attn_implementation,
        "seed": t.seed,
        "output_dir": str(work_dir / "output"),  # = ctx.output_dir: Axolotl saves the trained adapter there
        "save_strategy": "no",
        "save_first_step": False,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "use_wandb": False,
        "special_tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"},
    }
    if t.gradient_checkpointing:
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if m.is_peft:
        cfg.update({"adapter": "qlora" if m.kind == "qlora" else "lora", "lora_r": m.lora_r,
                    "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                    "lora_target_modules": m.resolved_targets(), "peft_use_dora": m.kind == "dora"})
    if m.kind == "qlora":
        cfg.update({"load_in_4bit": True, "bnb_config_kwargs": {
            "bnb_4bit_quant_type": m.quant.quant_type, "bnb_4bit_use_double_quant": m.quant.double_quant,
            "bnb_4bit_compute_dtype": m.quant.compute_dtype}})
    if distributed.sharded_4bit(sc):  # stored in the compute dtype: the 4-bit weights shard with the rest
        cfg["bnb_config_kwargs"]["bnb_4bit_quant_storage"] = m.quant.compute_dtype
    cfg.update(distributed.axolotl_config(sc, work_dir, layer_class))  # FSDP / ZeRO-3 in Axolotl's own keys
    if liger:
        cfg["plugins"] = [LIGER_PLUGIN]
        cfg.update(dict.fromkeys(LIGER_FLAGS, True))
    return cfg


# the activation_offloading modes whose trainer steps run inside TRL's OffloadActivations (Axolotl's
# ActivationOffloadingMixin: "legacy" without CUDA streams); "hidden_states" offloads inside the checkpoint instead
OFFLOADING_MODES = (True, "legacy", "disk")


def switches(cfg: dict[str, Any]) -> dict[str, Any]:
    """The speed switches a config asks for, under the read-back keys of :mod:`adapters_for_tools.switches`.

    Liger-Kernel: the plugin listed and one of its switches on. Axolotl's fused LoRA kernels only where the config
    sets them: left unset, Axolotl decides (on for LoRA/QLoRA), and the live model shows what it decided.
    Activation offloading for the modes that run the step inside ``OffloadActivations`` (:data:`OFFLOADING_MODES`).
    """
    out: dict[str, Any] = {"liger_kernel": LIGER_PLUGIN in (cfg.get("plugins") or [])
                           and any(cfg.get(f) for f in (*LIGER_FLAGS, "liger_swiglu", "liger_cross_entropy"))}
    if any(cfg.get(k) is not None for k in LORA_KERNELS):
        out["axolotl_lora_kernels"] = sorted(kind for k, kind in LORA_KERNELS.items() if cfg.get(k))
    if cfg.get("activation_offloading") in OFFLOADING_MODES:
        out["activation_offloading"] = True
    return out


def tokenised_rows(rows: list[dict[str, Any]], fmt: str, tokenizer: Any, seq_len: int,
                   prompt_loss: bool = False) -> list[dict[str, list[int]]]:
    """Conversation rows as Axolotl's custom pre-tokenised dataset: ``input_ids`` and ``labels`` of
    ``harness.inputs.data.tokenize_example`` (cut at ``seq_len``, so Axolotl's filter of rows over
    ``sequence_len`` drops none) and an ``attention_mask`` of ones."""
    out = []
    for r in rows:
        t = tokenize_example(tokenizer, r, fmt, seq_len, prompt_loss)
        out.append({"input_ids": t["input_ids"], "attention_mask": [1] * len(t["input_ids"]), "labels": t["labels"]})
    return out
