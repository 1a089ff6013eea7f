"""Preference and RL rows from the synthetic tasks: pairs (DPO, ORPO), labelled completions (KTO), prompts (GRPO).

Every row's prompt is the one the model sees at training and at evaluation (``harness.inputs.data.prompt_response``
on the Alpaca row, ending in ``"### Response:\\n"``), and its completions are bare answers, as in the SFT rows.

- a **pair**: chosen = the correct answer; rejected = one of the example's distractors (chosen by a seeded draw),
  each a plausible wrong answer of the right shape (``harness.inputs.tasks.generator``): the sum off by one or ten
  (a slipped carry), the digits in another order, another value shown in the prompt, another letter of the word;
- **labelled** completions, unpaired as KTO is meant for: one per example, its correct answer (``label: true``)
  and its rejected one (``false``) in turn, so each prompt is seen once and good and bad rows alternate;
- a **prompt** with its ``answer``: what GRPO samples completions for and rewards by exact match.
"""

from __future__ import annotations

import random

from harness.inputs.data import prompt_response
from harness.inputs.preference import ALPACA, PAIRS, convert
from harness.inputs.tasks.generator import Example


def prompt_of(ex: Example) -> str:
    """The training-time prompt of a task example."""
    return prompt_response(ex.alpaca(), ALPACA)[0][0]


def pairs(examples: list[Example], seed: int, family: str) -> list[dict[str, str]]:
    """prompt/chosen/rejected rows, one per example, deterministic in ``seed`` (per family: adding a family's
    rows leaves the others unchanged)."""
    rng = random.Random(f"{seed}:pairs:{family}")
    return [{"prompt": prompt_of(ex), "chosen": ex.output, "rejected": rng.choice(ex.distractors)}
            for ex in examples]


def labelled(pair_rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """prompt/completion/label rows for KTO: the chosen completion of even rows (good), the rejected one of odd
    rows (bad)."""
    both = convert(pair_rows, PAIRS, "kto")  # chosen, rejected, chosen, rejected, ...
    return [row for i, row in enumerate(both) if (i // 2) % 2 == i % 2]


def prompts(examples: list[Example]) -> list[dict[str, str]]:
    """prompt/answer rows for GRPO."""
    return [{"prompt": prompt_of(ex), "answer": ex.output} for ex in examples]
