"""Preference rows (``prompt`` / ``chosen`` / ``rejected`` text; KTO's ``prompt`` / ``completion`` / ``label``) as
the trainer's token lists, tokenised the way TRL 1.16 tokenises them, so that tunebench and TRL train on the same
token ids.

- DPO (``trl/trainer/dpo_trainer.py`` ``_prepare_dataset`` + ``DataCollatorForPreference``): EOS appended to each
  completion's text unless it ends with it; ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` tokenised with
  the tokenizer's special tokens (BOS); the completion starts where the tokenised prompt stops being a prefix of
  both; a pair whose prompt alone fills ``max_length`` is dropped; each sequence is cut to ``max_length`` from the
  end (``truncation_mode="keep_start"``).
- ORPO (``trl/experimental/orpo`` ``tokenize_row``): ``prompt`` and ``prompt + completion`` tokenised without
  special tokens; the completion starts after the prompt's tokens (one earlier where the last prompt token merged
  with the completion); BOS prepended to the prompt and EOS appended to each completion unless present; each
  completion cut so that ``prompt + completion`` fits ``max_length``. TRL keeps a prompt per side there; the
  trainer's pairs share one prompt, so with a tokenizer that merges across the boundary on one side only, the
  shorter prompt is used and the other side's extra token counts as completion (never with the byte-level
  tokenizer of the generated checkpoints).
- KTO (``trl/trainer/kto_trainer.py`` ``_prepare_dataset``): each completion as DPO's (EOS appended, the split where
  the tokenised prompt stops being a prefix of ``prompt + completion``, a row whose prompt alone fills
  ``max_length`` dropped), not cut here: the trainer cuts each sequence, and each KL sequence built from the rows of
  one micro-batch, to ``max_length`` as TRL's collator does (:mod:`kernels.trainer.kto`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _with_eos(tok: Any, prompt: str, completion: str) -> tuple[list[int], list[int], int]:
    """DPO's and KTO's tokenisation of one completion: ``(prompt ids, prompt + completion + EOS ids, where the
    prompt's tokens stop being a prefix of the whole)``, special tokens (BOS) included."""
    eos = tok.eos_token
    completion = completion if completion.endswith(eos) else completion + eos
    prompt_ids, whole = tok(prompt)["input_ids"], tok(prompt + completion)["input_ids"]
    return prompt_ids, whole, _common_prefix(prompt_ids, whole)


def dpo_pairs(rows: Iterable[dict[str, str]], tok: Any, max_length: int | None) -> list[dict[str, list[int]]]:
    """TRL's DPO tokenisation of text rows (module docstring); returns ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` per kept row."""
    pairs = []
    for row in rows:
        prompt_ids, with_chosen, nc = _with_eos(tok, row["prompt"], row["chosen"])
        _, with_rejected, nr = _with_eos(tok, row["prompt"], row["rejected"])
        n = min(nc, nr)
        if max_length is not None and n >= max_length:
            continue  # TRL drops it: keep_start truncation would leave no completion token
        keep = None if max_length is None else max_length - n
        pairs.append({"prompt_ids": prompt_ids[:n], "chosen_ids": with_chosen[n:][:keep],
                      "rejected_ids": with_rejected[n:][:keep]})
    return pairs


def _answer(tok: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL ORPO's ``build_tokenized_answer``: ``(prompt ids, answer ids)`` split from ``prompt + answer``."""
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def orpo_pairs(rows: Iterable[dict[str, str]], tok: Any, max_length: int) -> list[dict[str, list[int]]]:
    """TRL's ORPO tokenisation of text rows (module docstring); returns ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` per row."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pairs = []
    for row in rows:
        cp, chosen = _answer(tok, row["prompt"], row["chosen"])
        rp, rejected = _answer(tok, row["prompt"], row["rejected"])
        n = min(len(cp), len(rp))
        prompt, chosen, rejected = cp[:n], cp[n:] + chosen, rp[n:] + rejected
        if bos is not None and (not prompt or prompt[0] != bos):
            prompt = [bos, *prompt]
        chosen = chosen if chosen and chosen[-1] == eos else [*chosen, eos]
        rejected = rejected if rejected and rejected[-1] == eos else [*rejected, eos]
        keep = max(0, max_length - len(prompt))  # the completion is cut, never the prompt
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen[:keep], "rejected_ids": rejected[:keep]})
    return pairs


def kto_rows(rows: Iterable[dict[str, Any]], tok: Any, max_length: int | None) -> list[dict[str, Any]]:
    """TRL's KTO tokenisation of labelled text rows (module docstring); returns ``prompt_ids``, ``completion_ids``
    and ``label`` per kept row, in order."""
    out = []
    for row in rows:
        prompt_ids, whole, n = _with_eos(tok, row["prompt"], row["completion"])
        if max_length is not None and n >= max_length:
            continue  # TRL drops it: the collator's cut would leave no completion token
        out.append({"prompt_ids": prompt_ids[:n], "completion_ids": whole[n:], "label": bool(row["label"])})
    return out
