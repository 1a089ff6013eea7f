"""The scenario as Unsloth's own calls (pure; no toolkit import): three keyword sets saved as ``unsloth.json`` (the
preference and RL objectives: ``rl_config``).

- ``from_pretrained``: ``FastLanguageModel.from_pretrained`` (checkpoint, max_seq_length, dtype, 4-bit, full FT).
- ``get_peft_model``: ``FastLanguageModel.get_peft_model`` (r, alpha, dropout, targets, bias none,
  ``use_gradient_checkpointing``).
- ``sft``: TRL ``SFTConfig`` for the ``SFTTrainer`` Unsloth patches (same settings as the trl adapter).
- ``environment``: variables the row's overrides set before the model loads (:func:`row_environment`).

Decision: gradient checkpointing on -> ``use_gradient_checkpointing="unsloth"`` (Unsloth's own implementation,
which offloads the checkpointed activations to CPU; what Unsloth recommends and what its users run), off ->
``False``. Override with ``overrides: {use_gradient_checkpointing: true}`` for Transformers' implementation (Unsloth's
plain mode: activations stay on the GPU, faster). The adapter reads the mode back from the live model
(:func:`adapters_for_tools.switches.read_unsloth_checkpointing`) and compares it with :func:`checkpoint_mode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_for_tools import switches
from adapters_for_tools.contract import trainer_args
from adapters_for_tools.prompt_completion import sft_trainer_rows


def native_config(sc, work_dir: Path, checkpoint: str, data_file: Path,
                  use_gradient_checkpointing: bool | str | None = None, fmt: str = "text") -> dict[str, Any]:
    """Unsloth call arguments for scenario ``sc``: ``{"from_pretrained", "get_peft_model", "sft", "data_file"}``.

    Args:
        sc: the scenario.
        work_dir: the run's scratch directory (trainer output goes under it).
        checkpoint: model directory every framework loads.
        data_file: the JSONL Unsloth reads (:func:`trainer_rows`).
        use_gradient_checkpointing: the row's override (``"unsloth"``, True, False); None: ``"unsloth"`` when the
            scenario checkpoints, else False.
        fmt: the sweep rows' format: other than plain text they are prompt/completion rows, whose prompt is
            trained on only when the scenario says so.
    """
    fp, peft = model_calls(sc, checkpoint, use_gradient_checkpointing)
    sft = {
        **training_args(sc, work_dir),
        "train_sampling_strategy": "sequential",
        "shuffle_dataset": False,
        "disable_tqdm": True,
        "max_length": sc.data.seq_len,
        "packing": sc.data.packing,
        "dataset_num_proc": 1,
        "dataset_text_field": "text",
    } | ({"completion_only_loss": not sc.data.prompt_loss} if fmt != "text" else {})
    return {"from_pretrained": fp, "get_peft_model": peft, "sft": sft, "data_file": str(data_file)}


def model_calls(sc, checkpoint: str,
                use_gradient_checkpointing: bool | str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The keywords of ``FastLanguageModel.from_pretrained`` and of ``get_peft_model`` (None for full fine-tuning),
    the same for every objective; ``use_gradient_checkpointing`` as for :func:`native_config`."""
    m, t = sc.method, sc.train
    gc: bool | str = "unsloth" if t.gradient_checkpointing else False
    if use_gradient_checkpointing is not None:
        gc = use_gradient_checkpointing
    fp = {"model_name": str(checkpoint), "max_seq_length": sc.data.seq_len, "dtype": sc.model.dtype,
          "load_in_4bit": m.kind == "qlora", "load_in_8bit": False, "full_finetuning": m.kind == "full",
          "attn_implementation": sc.model.attn_implementation, "local_files_only": True,
          "use_gradient_checkpointing": gc}
    peft = None
    if m.is_peft:
        peft = {"r": m.lora_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
                "target_modules": m.resolved_targets(), "bias": "none", "use_gradient_checkpointing": gc,
                "random_state": t.seed, "use_rslora": False}
    return fp, peft


def training_args(sc, work_dir: Path) -> dict[str, Any]:
    """The ``TrainingArguments`` every TRL config Unsloth patches gets alike (SFT here, the other objectives in
    ``rl_config``): the scenario's optimisation settings, precision, seed, logging every step, no saving or
    reporting. Explicit, because Unsloth's patched configs change TRL's defaults (``optim="adamw_8bit"``,
    ``weight_decay=0.001``, ``seed=3407``, a warmup of 10 % of the steps)."""
    t = sc.train
    return {
        "output_dir": str(Path(work_dir) / "trainer"),
        **trainer_args(sc),
        "bf16": sc.model.dtype == "bfloat16",
        "fp16": sc.model.dtype == "float16",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": t.seed,
        "data_seed": t.seed,
        "dataloader_num_workers": 0,
    }


# Unsloth's own rule (unsloth.models._utils.apply_unsloth_gradient_checkpointing): below this max_seq_length its
# offloading mode is not worth the host copies, and it checkpoints plainly instead
OFFLOAD_MIN_SEQ = 512


def _asked_mode(cfg: dict[str, Any]) -> bool | str:
    """The checkpoint mode a native config asks Unsloth for: ``get_peft_model``'s, or ``from_pretrained``'s for
    full fine-tuning."""
    return (cfg["get_peft_model"] or cfg["from_pretrained"])["use_gradient_checkpointing"]


def checkpoint_mode(cfg: dict[str, Any]) -> bool | str:
    """The checkpoint mode the live model must show: the asked one, except ``"unsloth"`` under
    :data:`OFFLOAD_MIN_SEQ` tokens, which Unsloth itself turns into plain checkpointing (True;
    :func:`checkpoint_note` says so in the run)."""
    asked = _asked_mode(cfg)
    if asked == "unsloth" and cfg["from_pretrained"]["max_seq_length"] < OFFLOAD_MIN_SEQ:
        return True
    return asked


BLOCK_COMPILE_VARIABLE = "UNSLOTH_BLOCK_COMPILE"


def row_environment(block_compile: bool | None) -> dict[str, str]:
    """The environment variables a row's overrides set before Unsloth loads the model (``cfg["environment"]``, so
    a rerun of the saved config sets them too): its per-layer compile on or off; None leaves Unsloth's default."""
    return {} if block_compile is None else {BLOCK_COMPILE_VARIABLE: "1" if block_compile else "0"}


def expect_switches(ctx, cfg: dict[str, Any]) -> None:  # noqa: ANN001
    """What the live model must show for native config ``cfg`` (its checkpoint mode, and the per-layer compile
    where the row sets it), and the run's note where Unsloth's own rule changes the asked checkpoint mode."""
    asked = {switches.UNSLOTH_GC: checkpoint_mode(cfg)}
    if BLOCK_COMPILE_VARIABLE in cfg.get("environment", {}):
        asked[switches.UNSLOTH_BLOCK_COMPILE] = cfg["environment"][BLOCK_COMPILE_VARIABLE] == "1"
    switches.expect(ctx, **asked)
    if note := checkpoint_note(cfg):
        ctx.extra["tool_rule"] = note


def checkpoint_note(cfg: dict[str, Any]) -> str | None:
    """The run's note where Unsloth's own rule changes the asked checkpoint mode, else None."""
    if checkpoint_mode(cfg) == _asked_mode(cfg):
        return None
    return (f"use_gradient_checkpointing='unsloth' asked; Unsloth checkpoints plainly (True) below "
            f"{OFFLOAD_MIN_SEQ} tokens (max_seq_length {cfg['from_pretrained']['max_seq_length']}), by its own rule")


def cannot_honour(sc) -> list[tuple[str, str]]:
    """Scenario settings Unsloth cannot reproduce exactly: (setting, why)."""
    out = []
    if sc.method.kind == "qlora" and not sc.method.quant.double_quant:
        out.append(("method.quant.double_quant", "Unsloth's 4-bit loading always uses double quantisation"))
    if sc.method.kind == "qlora" and sc.method.quant.quant_type != "nf4":
        out.append(("method.quant.quant_type", "Unsloth loads 4-bit weights as nf4 only"))
    return out


def trainer_rows(rows: list[dict], fmt: str, tokenizer: Any, sc: Any = None) -> tuple[list[dict], dict[str, Any]]:
    """The rows Unsloth's ``SFTTrainer`` is given for the sweep's rows of format ``fmt``: chat and alpaca rows as
    for TRL (``adapters_for_tools.prompt_completion.sft_trainer_rows``: prompt/completion, or pre-tokenised
    conversations with several assistant turns), and the BOS text at the start of each text sample
    (:func:`with_bos` says why).

    Args:
        rows: the sweep's rows.
        fmt: their format.
        tokenizer: the checkpoint's (its BOS text; and the ids of pre-tokenised conversations).
        sc: the scenario (``seq_len``, ``prompt_loss``, ``packing``); None: prompt/completion only.

    Returns ``(rows, notes)``: the same list object when nothing changed (the sweep's file can be read as it is);
    notes for the run's ``extra`` (``differences`` of the split, ``data`` when the rows were rewritten).

    Raises:
        ValueError: conversations with several assistant turns in a packed scenario (Unsloth pads pre-tokenised
            rows with ``DataCollatorForSeq2Seq``, which keeps no sample boundary in a packed row), or without
            ``sc``.
    """
    notes: dict[str, Any] = {}
    if fmt != "text":
        tokenise = sc is not None and not sc.data.packing
        try:
            rows, diffs = sft_trainer_rows(rows, fmt, "Unsloth", tokenizer if tokenise else None,
                                           sc.data.seq_len if tokenise else None, tokenise and sc.data.prompt_loss)
        except ValueError as e:
            if sc is not None and sc.data.packing:
                raise ValueError(f"{e}; conversations with several go pre-tokenised, which Unsloth pads with "
                                 "DataCollatorForSeq2Seq, keeping no sample boundary in a packed row: "
                                 "leave data.packing off") from None
            raise
        if rows and "input_ids" in rows[0]:
            notes["data"] = diffs[0]
            return rows, notes
        if diffs:
            notes["differences"] = diffs
    rows, changed = with_bos(rows, getattr(tokenizer, "bos_token", None))
    if changed:
        notes["data"] = ("BOS text written at the start of every sample: Unsloth tokenises without special tokens "
                         "unless the text starts with it; so it trains the same token ids as the others")
    return rows, notes


def with_bos(rows: list[dict], bos: str | None) -> tuple[list[dict], bool]:
    """Rows whose text (``text``, or ``prompt`` for prompt/completion rows) starts with the BOS text.

    Unsloth's SFTTrainer patch tokenises with ``add_special_tokens=False`` unless the first sample already starts
    with the BOS text (unsloth/models/rl_replacements.py, the ``has_bos_token_already`` check). On plain text that
    drops the BOS every other framework trains on (2047 tokens per sample where the others have 2048 in the 8B
    scenarios). Writing the BOS into the text, as a chat template would, gives Unsloth the same token ids.
    Returns ``(rows, changed)``.
    """
    if not bos or not rows:
        return rows, False
    field = "text" if "text" in rows[0] else "prompt"
    if all(str(r.get(field, "")).startswith(bos) for r in rows):
        return rows, False
    return [r | {field: bos + r[field]} if not str(r[field]).startswith(bos) else r for r in rows], True
