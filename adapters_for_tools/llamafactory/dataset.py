"""The sweep's rows as LLaMA-Factory reads them: a JSONL and its ``dataset_info.json`` entry (pure; no toolkit import).

LLaMA-Factory reads every dataset through an entry of ``dataset_info.json`` in ``dataset_dir`` (``formatting:
alpaca``, its columns renamed by ``columns``). What the harness's rows become, and the stage that reads them:

- ``text`` rows -> column ``prompt: text``; stage ``pt``.
- Alpaca, messages, sharegpt rows, split as for TRL (the prompt, then the loss-bearing rest:
  ``adapters_for_tools.prompt_completion``) -> columns ``prompt: instruction``, ``query: input`` (always empty),
  ``response: output``; stage ``sft``.
- Conversations where a row has another number of assistant turns than one (form ``turns``): LLaMA-Factory's own
  ``sharegpt`` formatting, ``{"conversations": [{"from": "human" | "gpt", "value": ...}]}``, each ``gpt`` value an
  assistant turn's text and each ``human`` value the harness's rendered text between two of them; stage ``sft``,
  which trains every assistant turn (``mask_history`` off, its default).
- dpo / orpo pairs ``prompt, chosen, rejected`` -> the same columns with ``ranking: true``; stage ``dpo``
  (``pref_loss: orpo`` for ORPO).
- kto's labelled completions ``prompt, completion, label`` -> ``prompt``, ``response: completion``,
  ``kto_tag: label``; stage ``kto``.

Token ids, the same as the harness's (``harness.inputs.data.tokenize_example``) and TRL's: the stages other than pt
render through LLaMA-Factory's ``empty`` template, whose user turn is the content as is and whose assistant turn is
the content with no EOS, each encoded without special tokens. So the prompt column carries the harness's rendered
prompt (Alpaca: ``ALPACA_PROMPT``; the instruction is not joined to an input by LLaMA-Factory's ``"\\n"``) with the
BOS text in front, and every response the EOS text after it: ids ``<bos> + prompt + response + <eos>``, labels on
the response and the EOS. With the scenario's ``prompt_loss`` the prompt bears loss too, but not through
LLaMA-Factory's ``train_on_prompt``: that labels the ``<bos>`` as well, and the Trainer (transformers 5.6) counts
every label it divides the loss by, though no position predicts the first token, so loss and gradients would be
the harness's times ``n / (n + rows)`` (measured: step-1 loss 5.681 against hf's 5.759, quality-tiny on Alpaca
rows). The prompt column then holds the BOS text alone and the response the whole rendered row: the same ids, and
labels on every token after the ``<bos>``, as the harness's. The pt stage appends the EOS itself and adds ``<bos>``
only for tokenizers with ``add_bos_token``: the adapter passes the BOS text for text rows only when it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters_for_tools.prompt_completion import assistant_turns, split_rows
from harness.inputs.data import CONVERSATIONS, prompt_response

DATASET_NAME = "tunebench"
FILE_NAME = "data.jsonl"
# form -> LLaMA-Factory's column names (DatasetAttr: prompt, query, response, chosen, rejected, kto_tag)
COLUMNS = {
    "text": {"prompt": "text"},
    "sft": {"prompt": "instruction", "query": "input", "response": "output"},
    "pairs": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "labelled": {"prompt": "prompt", "response": "completion", "kto_tag": "label"},
    "turns": {"messages": "conversations"},  # sharegpt formatting; its default tags: from, value, human, gpt
}
STAGES = {"text": "pt", "sft": "sft", "pairs": "dpo", "labelled": "kto", "turns": "sft"}
FORM_OF_OBJECTIVE = {"dpo": "pairs", "orpo": "pairs", "kto": "labelled"}  # the sweep's rows (harness.inputs.preference)


def form_of(kind: str, fmt: str) -> str:
    """The form of a run's rows (:data:`COLUMNS`) for objective ``kind`` and the sweep's row format ``fmt``.

    Raises:
        ValueError: an objective LLaMA-Factory has no stage for (grpo; validation refuses it first).
    """
    if kind == "sft":
        return "text" if fmt == "text" else "sft"
    if kind not in FORM_OF_OBJECTIVE:
        raise ValueError(f"LLaMA-Factory has no stage for objective {kind!r}")
    return FORM_OF_OBJECTIVE[kind]


def form_of_rows(kind: str, fmt: str, rows: list[dict[str, Any]], prompt_loss: bool = False) -> str:
    """:func:`form_of`, and ``turns`` for SFT conversations of which a row has another number of assistant turns
    than one (which the prompt/response columns cannot hold). With ``prompt_loss`` every token after the ``<bos>``
    bears loss, which one Alpaca row holds (:func:`lf_rows`), so the form stays ``sft``."""
    form = form_of(kind, fmt)
    if form == "sft" and not prompt_loss and fmt in CONVERSATIONS and assistant_turns(rows, fmt) - {1}:
        return "turns"
    return form


def dataset_info(file_name: str = FILE_NAME, form: str = "text") -> dict[str, Any]:
    """``dataset_info.json`` registering the run's JSONL of ``form`` under :data:`DATASET_NAME`."""
    entry: dict[str, Any] = {"file_name": file_name, "formatting": "sharegpt" if form == "turns" else "alpaca",
                             "columns": dict(COLUMNS[form])}
    if form == "pairs":
        entry["ranking"] = True  # the dpo stage reads only ranked datasets (and the others only unranked ones)
    return {DATASET_NAME: entry}


def lf_rows(rows: list[dict[str, Any]], fmt: str, form: str, bos: str, eos: str,
            prompt_loss: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The sweep's rows as the JSONL LLaMA-Factory reads (the module docstring says why BOS and EOS are text).

    Args:
        rows: the sweep's rows.
        fmt: their format from the dataset's ``.meta.json`` (``text``, ``alpaca``, ``messages``, ``sharegpt``; the
            objectives' ``pairs`` / ``labelled``).
        form: what they become (:func:`form_of`).
        bos: the BOS text put before each row's text or prompt ("" where LLaMA-Factory adds ``<bos>`` itself).
        eos: the EOS text put after each response (not for text rows: the pt stage appends it).
        prompt_loss: the scenario's ``data.prompt_loss`` (``sft`` rows): the prompt goes into the response.

    Returns:
        (rows, notes): ``notes`` says where the labels differ from the harness's (as :func:`split_rows`).
    """
    if form == "text":
        return [{"text": bos + r["text"]} for r in rows], []
    if form == "sft":
        pc, notes = split_rows(rows, fmt, "LLaMA-Factory", "instruction", "output")
        if prompt_loss:  # every token after the <bos> bears loss, as in the harness's labels: nothing differs
            return [{"instruction": bos, "input": "", "output": r["instruction"] + r["output"] + eos} for r in pc], []
        return [{"instruction": bos + r["instruction"], "input": "", "output": r["output"] + eos} for r in pc], notes
    if form == "pairs":
        return [{"prompt": bos + r["prompt"], "chosen": r["chosen"] + eos, "rejected": r["rejected"] + eos}
                for r in rows], []
    if form == "labelled":
        return [{"prompt": bos + r["prompt"], "completion": r["completion"] + eos, "label": bool(r["label"])}
                for r in rows], []
    if form == "turns":
        out = [{"conversations": conversation(prompt_response(r, fmt), bos, eos)} for r in rows]
        trailing = any(not bears for r in rows for _, bears in prompt_response(r, fmt)[-1:])
        return out, ([f"{fmt}: text after the last assistant turn bears loss in LLaMA-Factory's last gpt value, not "
                      "in the harness's labels"] if trailing else [])
    raise ValueError(f"unknown LLaMA-Factory row form {form!r} (one of {', '.join(COLUMNS)})")


def conversation(segments: list[tuple[str, bool]], bos: str, eos: str) -> list[dict[str, str]]:
    """A row's rendered segments (``harness.inputs.data.prompt_response``) as LLaMA-Factory's sharegpt turns.

    Consecutive segments of the same kind join: the loss-bearing ones (assistant turns) into ``gpt`` values, the
    others into the ``human`` values between them; the BOS text opens the first ``human`` value (an empty one
    when the row starts with an assistant turn), the EOS text closes the last ``gpt`` value, and text after the
    last assistant turn joins that value (the ``empty`` template writes each value as it is, so the ids are the
    harness's: ``<bos> + segments + <eos>``).

    Raises:
        ValueError: a row without an assistant turn (it trains nothing).
    """
    turns: list[dict[str, str]] = [{"from": "human", "value": bos}]
    for text, bears in segments:
        who = "gpt" if bears else "human"
        if turns[-1]["from"] == who:
            turns[-1]["value"] += text
        else:
            turns.append({"from": who, "value": text})
    if len(turns) < 2:
        raise ValueError("a conversation without an assistant turn: LLaMA-Factory's sharegpt rows end with one")
    if turns[-1]["from"] == "human":  # text after the last assistant turn
        turns[-2]["value"] += turns.pop()["value"]
    turns[-1]["value"] += eos
    return turns


def overlong(rows: list[dict[str, Any]], form: str, encode: Callable[[str], list[int]], seq_len: int) -> int:
    """How many of LLaMA-Factory's rows (:func:`lf_rows`) it cuts otherwise than the harness and TRL (the end of the
    sequence cut at ``seq_len``). Its ``infer_seqlen`` shares ``cutoff_len`` between the prompt and the (longest)
    response: the same cut when the prompt is under half of it and the response is not; otherwise, for a row too
    long, the prompt is cut too, or both in proportion. Text rows are cut at the end in the pt stage: 0 for them.
    Conversations (``turns``) go pair by pair (a ``human`` value and the ``gpt`` value after it), each pair sharing
    what is left of ``cutoff_len`` by the same rule, and the pairs after the first cut are dropped: the end-cut
    when the first pair that does not fit is cut that way.

    Args:
        rows: LLaMA-Factory's rows.
        form: their form.
        encode: the tokenizer without special tokens (``lambda s: tok(s, add_special_tokens=False)["input_ids"]``).
        seq_len: the scenario's ``data.seq_len`` (LLaMA-Factory's ``cutoff_len``).
    """
    if form == "text":
        return 0
    if form == "turns":
        return sum(_turns_cut_otherwise([len(encode(t["value"])) for t in r["conversations"]], seq_len) for r in rows)
    prompt_key = "instruction" if form == "sft" else "prompt"
    responses = {"sft": ("output",), "pairs": ("chosen", "rejected"), "labelled": ("completion",)}[form]
    n = 0
    for r in rows:
        prompt = len(encode(r[prompt_key]))
        response = max(len(encode(r[k])) for k in responses)
        n += _cut_otherwise(prompt, response, seq_len)
    return n


def _cut_otherwise(prompt: int, response: int, room: int) -> bool:
    """Whether ``infer_seqlen`` cuts a prompt and response of these lengths, given ``room`` tokens, otherwise than
    the end-cut: only where they do not fit, and then unless the prompt is under half the room and the response
    is not."""
    return prompt + response > room and not 2 * prompt < room <= 2 * response


def _turns_cut_otherwise(lengths: list[int], seq_len: int) -> bool:
    """Whether LLaMA-Factory cuts a conversation of these turn lengths (human, gpt, human, gpt, ...) otherwise than
    at ``seq_len`` tokens from its start (:func:`overlong`)."""
    left = seq_len
    for source, target in zip(lengths[::2], lengths[1::2], strict=True):
        if source + target > left:
            return _cut_otherwise(source, target, left)
        left -= source + target
    return False
