"""Rerun a saved ``unsloth.json`` (or ``unsloth_<kind>.json``) with Unsloth and TRL alone:
``python -m adapters_for_tools.unsloth.rerun FILE``.

No tunebench measurement: the same calls the adapter makes (from_pretrained, get_peft_model, then SFTTrainer, or the
objective's trainer as :mod:`adapters_for_tools.unsloth.trainers` builds it).
"""

# ruff: noqa: E402, I001
import unsloth  # noqa: F401  (first: it patches transformers/TRL/PEFT)

import json
import sys

from adapters_for_tools.unsloth import trainers


def main(path: str) -> None:
    """Load the saved configuration and train as the adapter did."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    cfg = json.load(open(path))
    model, tok = trainers.load_model(cfg)
    ds = load_dataset("json", data_files=cfg["data_file"], split="train")
    if cfg.get("objective", "sft") != "sft":
        trainers.objective_trainer(cfg, model, tok, ds).train()
        return
    SFTTrainer(model=model, processing_class=tok, args=SFTConfig(**cfg["sft"]), train_dataset=ds).train()


if __name__ == "__main__":
    main(sys.argv[1])
