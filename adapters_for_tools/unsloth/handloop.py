"""The Unsloth hand loop: the model, the trainer's config and the rows exactly as the unsloth adapter makes them,
trained by the plain HF-step loop of :mod:`harness.measuring.handloop.trainer_loop` instead of TRL's
``SFTTrainer.train``.

It lives beside the adapter (its heavy side, run in Unsloth's environment by ``python -m harness.measuring.handloop
unsloth``) so that it builds everything from the adapter's own functions, not from a copy of them:

- the model: ``FastLanguageModel.from_pretrained`` and ``get_peft_model`` with the keywords of
  :func:`adapters_for_tools.unsloth.config.native_config` for a row without overrides (Unsloth's offloading
  checkpoint mode ``"unsloth"`` when the scenario checkpoints), loaded by the adapter's ``trainers.load_model``;
- the micro-batches: the adapter's ``SFTTrainer`` (its config, its rows with the BOS text,
  :func:`~adapters_for_tools.unsloth.config.trainer_rows`) is built but not trained, and the loop reads its data
  loader, so the loop feeds what Unsloth's trainer feeds: by default its padding-free rows (a micro-batch's samples
  joined into one row, position_ids restarting at each sample);
- checkpointing: what ``SFTTrainer.train`` does to the model from that config (:func:`trainer_checkpointing`).

What the loop leaves out is the harness around the run and the Trainer's own step (the worker, the meter, the
callbacks, ``compute_loss``); the Trainer's bookkeeping it does run is its trainer's: the NaN/Inf loss check as its
config sets it (``logging_nan_inf_filter``) and its ``floating_point_ops`` (which Unsloth caches).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapters_for_tools import switches
from adapters_for_tools.unsloth import config as us_config
from adapters_for_tools.unsloth import trainers
from harness.inputs.data import write_jsonl
from harness.measuring.handloop.common import (
    MachineWatch,
    Unavailable,
    loader_steps,
    machine,
    read_back_transformers,
    sweep_examples,
)
from harness.measuring.handloop.knobs import HfKnobs
from harness.measuring.handloop.trainer_loop import train

LIBRARIES = ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo")


def trainer_checkpointing(model, args) -> dict[str, Any] | None:  # noqa: ANN001
    """Gradient checkpointing as ``SFTTrainer.train`` enables it from its config ``args``:
    ``model.gradient_checkpointing_enable`` with its ``gradient_checkpointing_kwargs`` when it checkpoints (where
    Unsloth installs its own checkpoint function on every layer). Returns those keywords (None when the config does
    not checkpoint)."""
    if not args.gradient_checkpointing:
        return None
    kwargs = args.gradient_checkpointing_kwargs
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return dict(kwargs or {})


def sft_trainer(model, tok, cfg: dict[str, Any], examples: list[dict], fmt: str, work: Path, sc):  # noqa: ANN001
    """The adapter's ``SFTTrainer`` over ``model``, not trained: its config (``cfg["sft"]``) and its rows
    (:func:`~adapters_for_tools.unsloth.config.trainer_rows` of the sweep's ``examples``) written under ``work``."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer  # after unsloth (run() imported it): the classes Unsloth patched

    rows, _ = us_config.trainer_rows(examples, fmt, tok, sc)
    path = Path(cfg["data_file"])
    write_jsonl(rows, path)
    return SFTTrainer(model=model, processing_class=tok, args=SFTConfig(**cfg["sft"]),
                      train_dataset=load_dataset("json", data_files=str(path), split="train"))


def read_back(model, optimizer) -> dict[str, Any]:  # noqa: ANN001
    """The settings of the live Unsloth model, with the unsloth adapter's switch read-back (checkpoint mode as
    installed, Liger-Kernel)."""
    return read_back_transformers(
        model, optimizer, lambda m: switches.read_unsloth_checkpointing(m) | switches.read_liger(m))


def run(sc, checkpoint: str, device: str, steps: int) -> dict:  # noqa: ANN001
    """Train the scenario with Unsloth's model and trainer data in a plain loop and measure it.

    Raises:
        Unavailable: ``unsloth`` is not importable here, the scenario is not on a GPU (Unsloth's kernels are
            GPU-only, and without one it would silently train on the CPU), or its objective is not SFT.
    """
    if importlib.util.find_spec("unsloth") is None:
        raise Unavailable("unsloth is not importable here: run in its environment (`python -m harness env create "
                          "unsloth`; `python -m harness selfcheck` does)")
    if device != "cuda":
        raise Unavailable("needs CUDA (Unsloth's kernels are GPU-only)")
    if not sc.objective.is_sft:
        raise Unavailable(f"the Unsloth loop trains SFT; objective {sc.objective.kind} has no hand loop")
    import unsloth  # noqa: F401  (first, on purpose: it patches transformers/TRL/PEFT on import)
    from unsloth import FastLanguageModel

    torch.manual_seed(sc.train.seed)
    watch = MachineWatch(device)
    from transformers import AutoTokenizer

    examples, fmt, data_settings = sweep_examples(sc, AutoTokenizer.from_pretrained(checkpoint))
    with tempfile.TemporaryDirectory(prefix="unsloth-loop-") as work:
        cfg = us_config.native_config(sc, Path(work), checkpoint, Path(work) / "unsloth_dataset.jsonl", fmt=fmt)
        model, tok = trainers.load_model(cfg)
        FastLanguageModel.for_training(model)
        trainer = sft_trainer(model, tok, cfg, examples, fmt, Path(work), sc)
        model = trainer.model  # what the trainer trains (the adapter's meter watches the same)
        trainer_kwargs = trainer_checkpointing(model, trainer.args)
        feed = loader_steps(trainer.get_train_dataloader(), sc.train.grad_accum, steps)
        # checkpointing is Unsloth's (get_peft_model and the trainer's call installed it): the knobs leave it alone;
        # the step's bookkeeping is its trainer's (NaN/Inf check as configured, its cached FLOP count)
        knobs = HfKnobs(nan_inf_filter=bool(trainer.args.logging_nan_inf_filter))
        log, settings = train(model, sc, device, feed, knobs, read_back, flos=trainer.floating_point_ops)
    return log.summary(sc.train.warmup_steps) | watch.finish() | {
        "settings": settings | log.geometry(sc.data.packing) | data_settings | machine(device, LIBRARIES)
        | {"checkpoint": str(checkpoint), "unsloth_calls": {k: cfg[k] for k in ("from_pretrained", "get_peft_model")},
           "trainer_checkpointing_kwargs": trainer_kwargs}}
