"""The scenario as LitGPT's own configuration (pure; no LitGPT import).

Three pieces:

- :func:`model_config` — a LitGPT ``Config`` mapping (``model_config.yaml``) for our HF ``config.json``. Our presets
  are not LitGPT model names, so the adapter registers this mapping under a name of its own in
  ``litgpt.config.name_to_config`` and lets LitGPT's converter (``convert_hf_checkpoint(dir, model_name=NAME)``)
  pick the Llama weight mapping and write ``model_config.yaml`` itself.
- :func:`native_config` — the keyword arguments of ``litgpt.finetune.lora.setup`` (or ``finetune.full.setup``) in
  the form of LitGPT's CLI YAML (``litgpt finetune_lora CKPT --config litgpt_finetune.yaml``). The adapter builds
  the same objects from this mapping (``JSON(**data.init_args)``, ``TrainArgs(**train)``, ...) and calls ``setup``.
- :func:`convert_rows` — the sweep's rows as LitGPT ``instruction``/``output`` rows for ``litgpt.data.JSON`` with the
  ``default`` prompt style (prompt passed through unchanged). A text row becomes ``instruction=""``,
  ``output=text``: LitGPT encodes the prompt ``""`` as ``<bos>`` and the output as ``text + <eos>``, giving
  ``<bos> + text + <eos>`` truncated to ``seq_len`` — the ids of ``harness.inputs.data.tokenize_example``. With
  ``mask_prompt=False`` LitGPT's labels are the ids (the ``<bos>`` label is dropped by the one-position shift).

LoRA targets map onto LitGPT's flags: ``q/k/v_proj`` -> ``lora_query/key/value`` (LitGPT's fused ``qkv`` carries
one LoRA per enabled part, same parameter count as three separate adapters), ``o_proj`` -> ``lora_projection``,
``gate/up/down_proj`` -> ``lora_mlp`` (all three or none), ``lm_head`` -> ``lora_head``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adapters_for_tools.prompt_completion import split_rows

MODEL_NAME_PREFIX = "tunebench-"  # LitGPT model names of our converted checkpoints
PRECISION = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true"}
OPTIMIZER = {"adamw_torch": "torch.optim.AdamW", "adamw_torch_fused": "torch.optim.AdamW",
             "adamw_8bit": "bitsandbytes.optim.AdamW8bit", "sgd": "torch.optim.SGD"}
MLP = ("gate_proj", "up_proj", "down_proj")


def model_config(hf: dict[str, Any], name: str) -> dict[str, Any]:
    """LitGPT ``Config`` keyword arguments for a Llama-shaped HF ``config.json`` (as a dict).

    Raises:
        ValueError: for an architecture this mapping does not cover (the adapter reports it as an error).
    """
    if hf.get("model_type") not in ("llama",):
        raise ValueError(f"model_type {hf.get('model_type')!r}: the litgpt adapter maps Llama configs only")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias: not mapped to LitGPT (Llama without biases only)")
    n_head = hf["num_attention_heads"]
    head = hf.get("head_dim") or hf["hidden_size"] // n_head
    cfg: dict[str, Any] = {
        "name": name,
        "hf_config": {"org": "tunebench", "name": name},
        "block_size": hf["max_position_embeddings"],
        "vocab_size": hf["vocab_size"],
        "padded_vocab_size": hf["vocab_size"],  # no padding: same embedding shape as the HF checkpoint
        "padding_multiple": 1,
        "n_layer": hf["num_hidden_layers"],
        "n_embd": hf["hidden_size"],
        "n_head": n_head,
        "head_size": head,
        "n_query_groups": hf.get("num_key_value_heads") or n_head,
        "intermediate_size": hf["intermediate_size"],
        "rotary_percentage": 1.0,
        "parallel_residual": False,
        "bias": False,
        "attn_bias": False,
        "norm_class_name": "RMSNorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "mlp_class_name": "LLaMAMLP",
        "rope_base": int(hf.get("rope_theta", 10000)),
    }
    if hf.get("tie_word_embeddings"):
        cfg["tie_embeddings"] = True  # not a Config field in 0.5.13: the adapter refuses tied checkpoints
    rs = hf.get("rope_scaling")
    if rs:
        if rs.get("rope_type", rs.get("type")) != "llama3":
            raise ValueError(f"rope_scaling {rs!r}: only llama3 scaling is mapped to LitGPT")
        cfg["rope_adjustments"] = {"factor": float(rs["factor"]), "low_freq_factor": float(rs["low_freq_factor"]),
                                   "high_freq_factor": float(rs["high_freq_factor"]),
                                   "original_max_seq_len": int(rs["original_max_position_embeddings"])}
    return cfg


def lora_flags(targets: list[str]) -> tuple[dict[str, bool], list[str]]:
    """LitGPT's ``lora_*`` flags for HF target names, and the targets LitGPT cannot express (empty = exact)."""
    t = set(targets)
    flags = {"lora_query": "q_proj" in t, "lora_key": "k_proj" in t, "lora_value": "v_proj" in t,
             "lora_projection": "o_proj" in t, "lora_mlp": bool(t & set(MLP)), "lora_head": "lm_head" in t}
    problems = []
    if flags["lora_mlp"] and not set(MLP) <= t:
        problems.append(f"LitGPT's lora_mlp adapts {'/'.join(MLP)} together; scenario targets "
                        f"{sorted(t & set(MLP))} only")
    known = {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head", *MLP}
    if t - known:
        problems.append(f"no LitGPT flag for {sorted(t - known)}")
    return flags, problems


def hf_targets(flags: dict[str, bool]) -> list[str]:
    """The HF target names LitGPT's flags adapt (inverse of :func:`lora_flags`)."""
    out = [n for f, n in (("lora_query", "q_proj"), ("lora_key", "k_proj"), ("lora_value", "v_proj"),
                          ("lora_projection", "o_proj"), ("lora_head", "lm_head")) if flags.get(f)]
    if flags.get("lora_mlp"):
        out += list(MLP)
    return sorted(out)


def epochs_for(sc, n_train: int) -> int:
    """LitGPT stops when its ``epochs`` are used up; enough for ``steps`` optimizer steps over ``n_train`` rows."""
    needed = sc.train.steps * sc.train.micro_batch * sc.train.grad_accum
    return max(1, math.ceil(needed / max(1, n_train)))


def native_config(sc, checkpoint_dir: Path, data_dir: Path, out_dir: Path, n_train: int) -> dict[str, Any]:
    """``setup(...)`` arguments of LitGPT's finetune script for scenario ``sc``, in LitGPT's CLI YAML form.

    Args:
        sc: the scenario.
        checkpoint_dir: the LitGPT-converted checkpoint (``lit_model.pth``, ``model_config.yaml``, tokenizer).
        data_dir: a directory with ``train.jsonl`` and ``val.jsonl`` (rows from :func:`convert_rows`).
        out_dir: LitGPT's ``out_dir`` (the run's output directory).
        n_train: rows in ``train.jsonl`` (sets ``epochs``).
    """
    m, t = sc.method, sc.train
    cfg: dict[str, Any] = {
        "checkpoint_dir": str(checkpoint_dir),
        "out_dir": str(out_dir),
        "precision": PRECISION[sc.model.dtype],
        "devices": 1,
        "num_nodes": 1,
        "seed": t.seed,
        "logger_name": "csv",
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": str(data_dir),  # a directory: train.jsonl in file order + val.jsonl (no random split)
            "mask_prompt": not sc.data.prompt_loss,
            # litgpt.prompts.Default passes the prompt through: it is already rendered as the harness renders it
            "prompt_style": {"class_path": "litgpt.prompts.Default"},
            "ignore_index": -100,
            "seed": t.seed,  # LitGPT shuffles train rows with this seed (the adapter pre-orders the file)
            "num_workers": 0,
        }},
        "train": {
            "save_interval": None,
            "log_interval": 1,
            "global_batch_size": t.micro_batch * t.grad_accum,  # one device: grad accum = global / micro
            "micro_batch_size": t.micro_batch,
            # LitGPT divides by lr_warmup_steps (0 raises ZeroDivisionError); the adapter replaces the schedule by a
            # constant one for constant scenarios, so this 1 only matters for a CLI rerun (warmup 1 + cosine)
            "lr_warmup_steps": 1,
            "epochs": epochs_for(sc, n_train),
            "max_steps": t.steps,
            "max_seq_length": sc.data.seq_len,
            "min_lr": 0.0,
        },
        "eval": {"interval": t.steps + 1, "max_new_tokens": 1, "max_iters": 1, "initial_validation": False,
                 "final_validation": False},
        "optimizer": {"class_path": OPTIMIZER[t.optimizer], "init_args": {"lr": t.lr, "weight_decay": t.weight_decay}},
    }
    if t.optimizer.startswith("adamw"):
        cfg["optimizer"]["init_args"].update({"betas": [0.9, 0.999], "eps": 1e-8})
    if m.is_peft:
        flags, _ = lora_flags(m.resolved_targets())
        alpha = int(m.lora_alpha) if float(m.lora_alpha).is_integer() else m.lora_alpha  # LitGPT types it int
        cfg.update({"lora_r": m.lora_r, "lora_alpha": alpha, "lora_dropout": m.lora_dropout, **flags})
    if m.kind == "qlora":
        cfg["quantize"] = f"bnb.{m.quant.quant_type}" + ("-dq" if m.quant.double_quant else "")
    return cfg


def script_name(sc) -> str:
    return "finetune_full" if sc.method.kind == "full" else "finetune_lora"


def cannot_honour(sc) -> list[tuple[str, str]]:
    """Scenario settings LitGPT's finetune scripts cannot reproduce: (setting, why)."""
    out = []
    t, m = sc.train, sc.method
    if t.gradient_checkpointing:
        out.append(("train.gradient_checkpointing", "LitGPT's single-device finetune_lora/finetune_full have no "
                    "activation checkpointing (only the multi-device ModelParallelStrategy path wraps blocks)"))
    if t.max_grad_norm is not None:
        out.append(("train.max_grad_norm", "LitGPT's finetune_lora/finetune_full reject train.max_norm "
                    "(validate_args): no gradient clipping"))
    if t.lr_scheduler != "constant":
        out.append(("train.lr_scheduler", f"LitGPT's schedule is linear warmup + cosine to min_lr, not "
                    f"{t.lr_scheduler!r}"))
    if sc.data.packing:
        out.append(("data.packing", "LitGPT's SFT data modules pad each micro-batch; no packing"))
    if m.is_peft:
        _, problems = lora_flags(m.resolved_targets())
        out += [("method.target_modules", p) for p in problems]
    if m.is_peft and not float(m.lora_alpha).is_integer():
        out.append(("method.lora_alpha", "LitGPT's CLI types lora_alpha as int"))
    if m.kind == "dora":
        out.append(("method.kind", "LitGPT has no DoRA"))
    if m.kind == "qlora" and m.quant.compute_dtype != sc.model.dtype:
        out.append(("method.quant.compute_dtype", f"LitGPT's bitsandbytes plugin computes in the precision's dtype "
                    f"({sc.model.dtype}), not {m.quant.compute_dtype}"))
    if t.optimizer == "adamw_8bit" and m.kind != "qlora":
        out.append(("train.optimizer", "LitGPT instantiates bitsandbytes optimizers only with --quantize"))
    if sc.eval.every_steps and sc.eval.tasks:
        out.append(("eval.every_steps", "intermediate saves are LitGPT LoRA checkpoints, not PEFT/HF directories "
                    "harness.analysis.evaluate reads"))
    return out


def convert_rows(rows: list[dict[str, Any]], fmt: str) -> tuple[list[dict[str, str]], list[str]]:
    """Sweep rows -> LitGPT ``{"instruction", "output"}`` rows (prompt rendered as the harness renders it).

    Returns:
        (rows, notes): notes list differences from the harness's labels (empty when identical).
    """
    if fmt == "text":
        return [{"instruction": "", "output": r["text"]} for r in rows], []
    return split_rows(rows, fmt, "LitGPT", "instruction", "output")


def cli_command(sc, cfg_path: Path, pythonpath: str = "", python: str = "python") -> str:
    """The command line that reruns the same configuration with LitGPT alone."""
    pp = f"PYTHONPATH={pythonpath} " if pythonpath else ""
    return f"{pp}{python} -m litgpt {script_name(sc)} --config {cfg_path}"
