"""The sweep's chat/instruction rows as two-part rows (prompt, then the loss-bearing rest), for tools that take them.

TRL's and Unsloth's ``SFTTrainer`` read ``{"prompt", "completion"}`` rows, LitGPT's JSON data module
``{"instruction", "output"}`` rows; each tool then trains on the second part only (unless the scenario trains on
the prompt too). The text of both parts is rendered as the harness renders it
(``harness.inputs.data.prompt_response``), so every tool sees the same prompts. Conversations with several
assistant turns do not fit two parts: tools built on TRL's ``SFTTrainer`` take them pre-tokenised
(:func:`sft_trainer_rows`). No toolkit import.
"""

from __future__ import annotations

from typing import Any

from harness.inputs.data import prompt_response, tokenize_example


def split_rows(rows: list[dict[str, Any]], fmt: str, tool: str, prompt_key: str,
               completion_key: str) -> tuple[list[dict[str, str]], list[str]]:
    """Alpaca, messages or sharegpt rows -> ``{prompt_key: ..., completion_key: ...}`` rows.

    The split is at the one loss-bearing segment (the assistant turn): what precedes it is the prompt, it and what
    follows it the completion.

    Args:
        rows: the sweep's rows.
        fmt: their format (``alpaca``, ``messages``, ``sharegpt``).
        tool: the tool's name, for messages (``"TRL"``).
        prompt_key: the tool's name of the first part (``"prompt"``).
        completion_key: the tool's name of the second part (``"completion"``).

    Returns:
        (rows, notes): ``notes`` lists where the tool's labels differ from the harness's (empty when identical):
        text after the assistant turn bears loss in the tool's completion, not in the harness's labels.

    Raises:
        ValueError: a row with no loss-bearing segment or more than one.
    """
    out, notes = [], set()
    for r in rows:
        segs = prompt_response(r, fmt)
        loss_idx = [i for i, (_, bears) in enumerate(segs) if bears]
        if len(loss_idx) != 1:
            raise ValueError(f"{fmt} row with {len(loss_idx)} loss-bearing turns: {tool}'s "
                             f"{prompt_key}/{completion_key} form takes exactly one")
        i = loss_idx[0]
        if i + 1 < len(segs):
            notes.add(f"{fmt}: text after the assistant turn ({segs[i + 1][0]!r}) bears loss in {tool}'s "
                      f"{completion_key}, not in the harness's labels")
        out.append({prompt_key: "".join(t for t, _ in segs[:i]), completion_key: "".join(t for t, _ in segs[i:])})
    return out, sorted(notes)


def sft_trainer_rows(rows: list[dict[str, Any]], fmt: str, tool: str, tokenizer: Any = None,
                     seq_len: int | None = None, prompt_loss: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat or Alpaca rows as TRL's ``SFTTrainer`` (and Unsloth's, which patches it) reads them.

    Rows with exactly one assistant turn -> ``{"prompt", "completion"}`` (:func:`split_rows`). Where a row has
    another number of assistant turns, which that form cannot hold, every row is given pre-tokenised instead:
    ``{"input_ids", "labels"}`` of ``harness.inputs.data.tokenize_example`` with ``tokenizer`` (the checkpoint's),
    the form ``SFTTrainer`` trains as given (Unsloth's dataset preparation then pads them with
    ``DataCollatorForSeq2Seq``): the harness's ids and labels, each assistant turn bearing loss.

    Returns:
        (rows, notes): ``notes`` lists differences from the harness's labels, or that choice.

    Raises:
        ValueError: several assistant turns and no ``tokenizer`` (:func:`split_rows`' error).
    """
    turns = assistant_turns(rows, fmt)
    if turns == {1} or tokenizer is None:
        return split_rows(rows, fmt, tool, "prompt", "completion")
    out = [tokenize_example(tokenizer, r, fmt, seq_len, prompt_loss) for r in rows]
    return out, [f"{fmt} rows with {sorted(turns)} assistant turns: given to {tool} pre-tokenised by the harness "
                 f"(input_ids and labels, which {tool} trains as given: its prompt/completion form holds one turn)"]


def assistant_turns(rows: list[dict[str, Any]], fmt: str) -> set[int]:
    """The numbers of loss-bearing segments (assistant turns; Alpaca's output) the rows have, as a set."""
    return {sum(bears for _, bears in prompt_response(r, fmt)) for r in rows}
