"""The Unsloth hand loop: ``FastLanguageModel`` loaded as the unsloth adapter loads it, trained by the plain HF-step
loop of :mod:`harness.measuring.handloop.trainer_loop` instead of TRL's ``SFTTrainer``.

Runs only where ``unsloth`` imports (its environment, on a GPU); elsewhere :func:`run` raises
:class:`~harness.measuring.handloop.common.Unavailable` and the check records why. ``import unsloth`` must come
before transformers, TRL and PEFT are imported (it patches them): :func:`run` imports it first, and nothing this
module imports at module level imports transformers.

:func:`unsloth_calls` writes down the adapter's ``from_pretrained`` and ``get_peft_model`` keywords for a row
without overrides (``adapters_for_tools/unsloth/config.py``; the tests hold the two equal): Unsloth's offloading
checkpoint mode ``"unsloth"`` when the scenario checkpoints. :func:`trainer_checkpointing` then does what the
adapter's ``SFTTrainer`` does to the model when it starts training: the adapter's ``SFTConfig`` leaves
:data:`TRAINER_CHECKPOINT_KEYS` at their defaults (TRL's, as Unsloth patches them; the tests hold the adapter to
that), and when those ask for gradient checkpointing the trainer calls ``gradient_checkpointing_enable`` with their
keywords, where Unsloth installs its own checkpoint function on every layer. The loop feeds
the same padded micro-batches as the hf loop, where the adapter's ``SFTTrainer`` feeds Unsloth padding-free rows:
that difference is listed, not hidden.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch

from adapters_for_tools import switches
from harness.measuring.handloop.common import (
    Unavailable,
    machine,
    peak_memory,
    read_back_transformers,
    reset_peak_memory,
    sweep_rows,
)
from harness.measuring.handloop.knobs import HfKnobs
from harness.measuring.handloop.trainer_loop import train

LIBRARIES = ("torch", "transformers", "peft", "unsloth", "unsloth_zoo")
# what the adapter's SFTConfig leaves at the config class's defaults, and the loop reads from a default config
TRAINER_CHECKPOINT_KEYS = ("gradient_checkpointing", "gradient_checkpointing_kwargs")


def unsloth_calls(sc, checkpoint: str) -> dict[str, Any]:  # noqa: ANN001
    """``FastLanguageModel.from_pretrained`` and ``get_peft_model`` keywords for scenario ``sc`` (JSON values; the
    dtype as its name), as the unsloth adapter passes them."""
    m, t = sc.method, sc.train
    gc: bool | str = "unsloth" if t.gradient_checkpointing else False
    fp = {"model_name": str(checkpoint), "max_seq_length": sc.data.seq_len, "dtype": sc.model.dtype,
          "load_in_4bit": m.kind == "qlora", "load_in_8bit": False, "full_finetuning": m.kind == "full",
          "attn_implementation": sc.model.attn_implementation, "local_files_only": True,
          "use_gradient_checkpointing": gc}
    peft = None
    if m.is_peft:
        peft = {"r": m.lora_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                "target_modules": m.resolved_targets(), "bias": "none", "use_gradient_checkpointing": gc,
                "random_state": t.seed, "use_rslora": False}
    return {"from_pretrained": fp, "get_peft_model": peft}


def trainer_checkpointing(model) -> dict[str, Any] | None:  # noqa: ANN001
    """Gradient checkpointing as the adapter's ``SFTTrainer`` enables it at ``train()``: from a default ``SFTConfig``
    (after ``import unsloth``: the class Unsloth patched; the adapter sets none of :data:`TRAINER_CHECKPOINT_KEYS`),
    ``model.gradient_checkpointing_enable`` with its ``gradient_checkpointing_kwargs`` when it checkpoints. Returns
    those keywords (None when the config does not checkpoint)."""
    from trl import SFTConfig  # after unsloth (run() imported it): the config class Unsloth patched

    with tempfile.TemporaryDirectory(prefix="unsloth-loop-") as d:
        args = SFTConfig(output_dir=d, report_to="none")
    if not args.gradient_checkpointing:
        return None
    kwargs = args.gradient_checkpointing_kwargs
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return dict(kwargs or {})


def read_back(model, optimizer) -> dict[str, Any]:  # noqa: ANN001
    """The settings of the live Unsloth model, with the unsloth adapter's switch read-back (checkpoint mode as
    installed, Liger-Kernel)."""
    return read_back_transformers(
        model, optimizer, lambda m: switches.read_unsloth_checkpointing(m) | switches.read_liger(m))


def run(sc, checkpoint: str, device: str, steps: int) -> dict:  # noqa: ANN001
    """Train the scenario with Unsloth's model in a plain loop and measure it.

    Raises:
        Unavailable: ``unsloth`` is not importable here, or the scenario is not on a GPU (Unsloth's kernels are
            GPU-only, and without one it would silently train on the CPU).
    """
    if importlib.util.find_spec("unsloth") is None:
        raise Unavailable("unsloth is not importable here: run in its environment (`python -m harness env create "
                          "unsloth`; `python -m harness selfcheck` does)")
    if device != "cuda":
        raise Unavailable("needs CUDA (Unsloth's kernels are GPU-only)")
    import unsloth  # noqa: F401  (first, on purpose: it patches transformers/PEFT on import)
    from unsloth import FastLanguageModel

    torch.manual_seed(sc.train.seed)
    reset_peak_memory(device)
    calls = unsloth_calls(sc, checkpoint)
    model, tok = FastLanguageModel.from_pretrained(**calls["from_pretrained"]
                                                   | {"dtype": getattr(torch, sc.model.dtype)})
    if calls["get_peft_model"]:
        model = FastLanguageModel.get_peft_model(model, **calls["get_peft_model"])
    FastLanguageModel.for_training(model)
    trainer_kwargs = trainer_checkpointing(model)
    rows, data_settings = sweep_rows(sc, tok)
    # checkpointing is Unsloth's (get_peft_model and the trainer's call installed it): the knobs leave it alone
    log, settings = train(model, tok, sc, device, steps, rows, HfKnobs(), read_back)
    return log.summary(sc.train.warmup_steps) | peak_memory(device) | {
        "settings": settings | log.geometry() | data_settings | machine(device, LIBRARIES)
        | {"checkpoint": str(checkpoint), "unsloth_calls": calls, "padding_free_rows": False,
           "trainer_checkpointing_kwargs": trainer_kwargs}}
