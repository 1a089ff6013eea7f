"""Rerun a saved ``unsloth.json`` with Unsloth and TRL alone: ``python -m adapters_for_tools.unsloth.rerun FILE``.

No tunebench measurement: the same three calls the adapter makes (from_pretrained, get_peft_model, SFTTrainer).
"""

# ruff: noqa: E402, I001
import unsloth  # noqa: F401  (first: it patches transformers/TRL/PEFT)

import json
import sys


def main(path: str) -> None:
    """Load ``unsloth.json`` and train as the adapter did."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    cfg = json.load(open(path))
    fp = dict(cfg["from_pretrained"], dtype=getattr(torch, cfg["from_pretrained"]["dtype"]))
    model, tok = FastLanguageModel.from_pretrained(**fp)
    if cfg["get_peft_model"]:
        model = FastLanguageModel.get_peft_model(model, **cfg["get_peft_model"])
    ds = load_dataset("json", data_files=cfg["data_file"], split="train")
    SFTTrainer(model=model, processing_class=tok, args=SFTConfig(**cfg["sft"]), train_dataset=ds).train()


if __name__ == "__main__":
    main(sys.argv[1])
