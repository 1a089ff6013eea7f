"""Save what tunebench trained in the formats everybody loads.

- LoRA / DoRA / QLoRA: a standard PEFT adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``, keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``,
  DoRA magnitudes as ``...q_proj.lora_magnitude_vector``) that
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` loads. QLoRA saves the same
  adapter; the base stays the original (unquantised) checkpoint, as with PEFT + bitsandbytes.
- Full fine-tuning: an HF checkpoint (the base ``config.json`` + ``model.safetensors`` with transformers' names).

:func:`peft_state_dict` / :func:`load_peft_state_dict` map between our modules and PEFT's key names (tests use
them to start both implementations from the same adapter weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.trainer.model import DecoderModel

PEFT_PREFIX = "base_model.model."


def peft_state_dict(model: DecoderModel) -> dict[str, torch.Tensor]:
    """LoRA (and DoRA magnitude) tensors under PEFT's saved key names, on the CPU, contiguous."""
    out = {}
    for name, mod in model.linears():
        if mod.lora_A is None:
            continue
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().cpu().contiguous()
        if mod.magnitude is not None:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = mod.magnitude.detach().cpu().contiguous()
    return out


def load_peft_state_dict(model: DecoderModel, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights given with PEFT key names (saved form, or live ``.default.`` names) into ``model``."""
    mods = dict(model.linears())
    done = 0
    for key, t in sd.items():
        k = key.removeprefix(PEFT_PREFIX).replace(".default", "")
        if k.endswith(".lora_magnitude_vector.weight"):
            k = k.removesuffix(".weight")
        for leaf, attr in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                           (".lora_magnitude_vector", "magnitude")):
            if k.endswith(leaf):
                p = getattr(mods[k.removesuffix(leaf)], attr)
                if p is None:
                    raise KeyError(f"{key}: the model has no {attr} there")
                with torch.no_grad():
                    p.copy_(t.to(p.dtype))
                done += 1
                break
    if done == 0:
        raise KeyError("no LoRA tensors in the state dict")


def full_state_dict(model: DecoderModel) -> dict[str, torch.Tensor]:
    """All weights under transformers' names (tied embeddings saved once, as transformers does)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().cpu().contiguous()
    for name, mod in model.linears():
        if mod.qweight is not None:
            raise ValueError(f"{name} is 4-bit: full checkpoints are for full fine-tuning")
    return out


def save_peft_adapter(model: DecoderModel, out_dir: str | Path, base_checkpoint: str | Path) -> Path:
    """Write a PEFT LoRA/DoRA adapter for ``model`` into ``out_dir``; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mods = [(n, m) for n, m in model.linears() if m.lora_A is not None]
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = mods[0][1]
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in mods})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_checkpoint),
        "r": first.lora_r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": targets,
        "use_dora": first.magnitude is not None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    try:  # let PEFT write its own complete config when it is importable (same keys, plus its defaults)
        from peft import LoraConfig

        cfg = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                         target_modules=targets, use_dora=config["use_dora"], bias="none", task_type="CAUSAL_LM")
        cfg.base_model_name_or_path = str(base_checkpoint)
        cfg.inference_mode = True
        cfg.save_pretrained(str(out_dir))
    except ImportError:
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(peft_state_dict(model), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def save_full_checkpoint(model: DecoderModel, out_dir: str | Path, base_checkpoint: str | Path) -> Path:
    """Write ``config.json`` (from the base, dtype updated) + ``model.safetensors``; copies tokenizer files."""
    out_dir, base = Path(out_dir), Path(base_checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base / "config.json").read_text())
    dtype = str(model.dtype).removeprefix("torch.")
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(full_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json"):
        if (base / f).exists():
            shutil.copy(base / f, out_dir / f)
    return out_dir


def save_trained(model: DecoderModel, out_dir: str | Path, base_checkpoint: str | Path) -> str:
    """Save in the method's format; returns what was saved (``"peft adapter"`` or ``"hf checkpoint"``)."""
    if model.options.is_peft:
        save_peft_adapter(model, out_dir, base_checkpoint)
        return "peft adapter"
    save_full_checkpoint(model, out_dir, base_checkpoint)
    return "hf checkpoint"
