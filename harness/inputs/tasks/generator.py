"""Deterministic synthetic instruction tasks, with a train split and a held-out eval split.

Each task *family* draws one example from a seeded :class:`random.Random`: an Alpaca row (``instruction``,
``input``, ``output``) plus distractors for the multiple-choice variant. The families are chosen for what a
tiny model that reads one byte per token can learn from scratch in minutes: short answers over a small
alphabet, and a rule that only depends on the input shown (no world knowledge).

=========  ==============================  ============  ===================================================
family     input (example)                 output        distractors (same length and alphabet as the answer)
=========  ==============================  ============  ===================================================
reverse    ``dbca``                        ``acbd``      the input itself, other permutations of its letters
upper      ``dbca``                        ``DBCA``      uppercase of the same letters in another order
recall     ``a=3 b=7 c=1 d=5; b``          ``7``         the other values shown in the prompt
sort       ``3 9 1 4``                     ``1 3 4 9``   the input order, other permutations
add        ``34+58``                       ``92``        the sum +-1, +-10 (wrong carries)
=========  ==============================  ============  ===================================================

Distractors are always plausible *formats* of an answer, so multiple-choice accuracy above chance means the
model conditions on the input, not merely that it learnt what answers look like.

The eval split is disjoint from the train split (no ``(instruction, input)`` pair in both), so eval accuracy
measures generalisation to unseen inputs of the trained rule.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefgh"  # a small alphabet: more repetitions of each symbol per training step
DIGITS = "0123456789"
WLO, WHI = 3, 5  # word lengths (inclusive)


@dataclass(frozen=True)
class Example:
    """One task instance: the Alpaca row plus what the multiple-choice variant needs."""

    family: str
    instruction: str
    input: str
    output: str
    distractors: tuple[str, ...]

    def alpaca(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _other_orders(rng: random.Random, items: list[str], answer: list[str], n: int, join: str) -> list[str]:
    """Up to ``n`` distinct orderings of ``items`` that differ from ``answer`` (deterministic given rng)."""
    out: list[str] = []
    seen = {join.join(answer)}
    for _ in range(50):
        if len(out) == n:
            break
        perm = items[:]
        rng.shuffle(perm)
        s = join.join(perm)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _fill(rng: random.Random, answer: str, got: list[str], make: Callable[[], str], n: int = 3) -> tuple[str, ...]:
    """Top ``got`` up to ``n`` distinct distractors with ``make()`` (inputs like ``aaa`` have no other orders)."""
    out = list(dict.fromkeys(d for d in got if d != answer))
    while len(out) < n:
        d = make()
        if d != answer and d not in out:
            out.append(d)
    return tuple(out[:n])


def reverse(rng: random.Random) -> Example:
    w = _word(rng, WLO, WHI)
    ans = w[::-1]
    got = [w] + _other_orders(rng, list(w), list(ans), 3, "")
    return Example("reverse", "Reverse the letters.", w, ans,
                   _fill(rng, ans, got, lambda: _word(rng, len(w), len(w))))


def upper(rng: random.Random) -> Example:
    w = _word(rng, WLO, WHI)
    ans = w.upper()
    got = _other_orders(rng, list(ans), list(ans), 3, "")
    return Example("upper", "Write it in capitals.", w, ans,
                   _fill(rng, ans, got, lambda: _word(rng, len(w), len(w)).upper()))


def _letters_besides(rng: random.Random, word: str, answer: str) -> tuple[str, ...]:
    """Distractors for a one-letter answer: the word's other letters first, then other letters of the alphabet."""
    return _fill(rng, answer, [c for c in word if c != answer], lambda: rng.choice(LETTERS))


def last(rng: random.Random) -> Example:
    w = _word(rng, WLO, WHI)
    return Example("last", "Give the last letter.", w, w[-1], _letters_besides(rng, w, w[-1]))


def first(rng: random.Random) -> Example:
    w = _word(rng, WLO, WHI)
    return Example("first", "Give the first letter.", w, w[0], _letters_besides(rng, w, w[0]))


def recall(rng: random.Random) -> Example:
    keys = rng.sample(LETTERS[:6], 4)
    vals = rng.sample(DIGITS, 4)  # distinct values: the distractors are exactly the other values shown
    q = rng.randrange(4)
    shown = " ".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True))
    return Example("recall", "Give the value of the key.", f"{shown}; {keys[q]}", vals[q],
                   tuple(v for i, v in enumerate(vals) if i != q))


def sort(rng: random.Random) -> Example:
    xs = rng.sample(DIGITS, 4)
    ans = sorted(xs)
    return Example("sort", "Sort the digits.", " ".join(xs), " ".join(ans),
                   tuple(_other_orders(rng, xs, ans, 3, " ")))


def add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s = a + b
    cands = [s + d for d in (1, -1, 10, -10, 11, -11, 2, -2)]
    same_len = [c for c in cands if len(str(c)) == len(str(s))]
    return Example("add", "Add the numbers.", f"{a}+{b}", str(s), tuple(str(c) for c in same_len[:3]))


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "last": last, "first": first, "reverse": reverse, "upper": upper, "recall": recall, "sort": sort, "add": add,
}


def generate(families: list[str], n_train: int, n_eval: int, seed: int = 0,
             n_train_family: int = 0, single: list[str] | None = None,
             ) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """Train and held-out eval examples, deterministic in ``seed``.

    Args:
        families: family names (keys of :data:`FAMILIES`), in the order they alternate.
        n_train: examples of the mixed train split (families interleaved round-robin).
        n_eval: eval examples *per family*.
        seed: the only source of randomness.
        n_train_family: examples of each extra single-family train split.
        single: families that get a single-family train split (default: none).

    Returns:
        ``(train, eval, train_by_family)``; no eval example shares its ``(instruction, input)`` with any
        train example, and no example appears twice within a split.
    """
    unknown = [f for f in [*families, *(single or [])] if f not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown task families {unknown} (available: {', '.join(FAMILIES)})")
    rngs = {f: random.Random(f"{seed}:{f}") for f in families}  # per family: adding one leaves others unchanged
    held_out: set[tuple[str, str]] = set()

    def draw(fam: str, seen: set[tuple[str, str]]) -> Example:
        for _ in range(10_000):
            ex = FAMILIES[fam](rngs[fam])
            key = (ex.instruction, ex.input)
            if key not in seen and key not in held_out:
                seen.add(key)
                return ex
        raise RuntimeError(f"family {fam!r} ran out of distinct examples")

    # eval first, so the held-out set does not depend on the train sizes
    evals = [draw(f, held_out) for f in families for _ in range(n_eval)]
    seen: set[tuple[str, str]] = set()
    train = [draw(families[i % len(families)], seen) for i in range(n_train)]
    by_family = {}
    for f in single or []:
        seen_f: set[tuple[str, str]] = set()
        by_family[f] = [draw(f, seen_f) for _ in range(n_train_family)]
    return train, evals, by_family
