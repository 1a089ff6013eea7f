"""Write the synthetic tasks to disk: train/eval JSONL and lm-eval task YAMLs (``python -m harness.inputs.tasks``).

The lm-eval prompt is not re-typed in a template: each eval row carries ``prompt``, built by
:func:`harness.inputs.data.prompt_response` — the very function that formats training rows — so the model sees
at evaluation exactly the text it was trained on (the worker prepends ``<bos>``; so does lm-eval with
``add_bos_token=True``, which :mod:`harness.analysis.evaluate` sets).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import yaml

from harness.inputs.data import prompt_response
from harness.inputs.models import EOS
from harness.inputs.tasks import pairs as pref
from harness.inputs.tasks.generator import FAMILIES, Example, generate

TRAIN_FILE, EVAL_FILE, LOADER = "tb_train.jsonl", "tb_eval.jsonl", "tb_tasks.py"
# generation stops at the end-of-text token the model was trained to emit, or at a newline (no answer has one)
UNTIL = [EOS, "\n"]
MAX_GEN_TOKS = 12  # longest answer ("1 2 3 4") is 7 characters = 7 tokens with the byte-level tokenizer


def eval_row(ex: Example, rng: random.Random) -> dict:
    """An eval JSONL row: the Alpaca fields, the training-time prompt, and shuffled choices with the gold index."""
    choices = [ex.output, *ex.distractors]
    rng.shuffle(choices)  # gold not always first: lm-eval's argmax breaks ties towards the first choice
    prompt = prompt_response(ex.alpaca(), "alpaca")[0][0]
    return {"family": ex.family, **ex.alpaca(), "prompt": prompt, "choices": choices,
            "gold": choices.index(ex.output)}


def task_yaml(name: str, kind: str, family: str | None) -> dict:
    """The lm-eval task config of one task (``kind`` ``gen`` or ``mc``)."""
    cfg: dict = {
        "task": name,
        "tag": ["tunebench_synth"],
        "custom_dataset": f"!function {LOADER.removesuffix('.py')}.load",
        "dataset_kwargs": {"file": EVAL_FILE, **({"family": family} if family else {})},
        "test_split": "test",
        "doc_to_text": "prompt",  # a field name, not a Jinja template: the prompt's newlines stay as they are
        "target_delimiter": "",  # the answer follows "### Response:\n" directly, as in training
    }
    if kind == "gen":
        cfg |= {"output_type": "generate_until", "doc_to_target": "output",
                "generation_kwargs": {"until": UNTIL, "do_sample": False, "max_gen_toks": MAX_GEN_TOKS},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": False, "ignore_punctuation": False}]}
    else:
        cfg |= {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    cfg["metadata"] = {"version": 1.0}
    return cfg


class _Dumper(yaml.SafeDumper):
    """Writes strings with control characters double-quoted ("\\n"), the way a person would."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style='"' if "\n" in s else None))


def _dump_yaml(cfg: dict) -> str:
    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, width=120)
    # `!function` is a YAML tag lm-eval resolves; safe_dump would quote it as a string
    return text.replace("'!function ", "!function ").replace(".load'", ".load")


def write(out: Path, families: list[str], n_train: int, n_eval: int, seed: int, single: list[str] | None = None,
          n_train_family: int = 0, pairs: list[str] | None = None, prompts: list[str] | None = None,
          n_prompts: int = 1000) -> list[Path]:
    """Generate the tasks and write every file into ``out``; returns the paths written.

    ``pairs`` and ``prompts`` name the families that get preference files and GRPO prompt files (the first
    ``n_prompts`` examples: a GRPO step samples several completions per prompt, so it reads few), drawn from
    single-family examples as ``single``'s train splits are (each family has its own random stream, so drawing one
    family's examples leaves every other file unchanged).
    """
    out.mkdir(parents=True, exist_ok=True)
    drawn = list(dict.fromkeys([*(single or []), *(pairs or []), *(prompts or [])]))
    train, evals, by_family = generate(families, n_train, n_eval, seed, n_train_family, drawn)
    rng = random.Random(f"{seed}:choices")
    written = []

    def put(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    put(TRAIN_FILE, "".join(json.dumps(e.alpaca()) + "\n" for e in train))
    for fam in single or []:
        put(f"tb_train_{fam}.jsonl", "".join(json.dumps(e.alpaca()) + "\n" for e in by_family[fam]))
    for fam in pairs or []:
        train_pairs = pref.pairs(by_family[fam], seed, fam)
        put(f"tb_pref_{fam}.jsonl", _jsonl(train_pairs))
        put(f"tb_kto_{fam}.jsonl", _jsonl(pref.labelled(train_pairs)))
        put(f"tb_pref_eval_{fam}.jsonl", _jsonl(pref.pairs([e for e in evals if e.family == fam], seed, f"eval:{fam}")))
    for fam in prompts or []:
        put(f"tb_prompts_{fam}.jsonl", _jsonl(pref.prompts(by_family[fam][:n_prompts])))
    put(EVAL_FILE, "".join(json.dumps(eval_row(e, rng)) + "\n" for e in evals))
    shutil.copyfile(Path(__file__).with_name("_lm_eval_loader.py"), out / LOADER)
    written.append(out / LOADER)
    header = (f"# generated by `python -m harness.inputs.tasks generate` (families {','.join(families)}, seed {seed}, "
              f"{n_eval} eval docs per family); do not edit by hand\n")
    for fam in [*families, "mix"]:
        for kind in ("gen", "mc"):
            name = f"tb_{fam}_{kind}"
            put(f"{name}.yaml", header + _dump_yaml(task_yaml(name, kind, None if fam == "mix" else fam)))
    return written


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        prog="python -m harness.inputs.tasks",
        description="Synthetic instruction tasks (train JSONL + held-out lm-eval tasks).",
        epilog="example:\n  python -m harness.inputs.tasks generate --out scenarios/tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write tb_train.jsonl, tb_eval.jsonl and the lm-eval task YAMLs")
    g.add_argument("--out", type=Path, required=True, help="output directory (e.g. scenarios/tasks)")
    g.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    g.add_argument("--train", type=int, default=6000, help="training examples in all (families interleaved)")
    g.add_argument("--single", default="last",
                   help="families that also get a single-family train split tb_train_<family>.jsonl")
    # 4800 >= 200 steps x 16 (quality_small), with room: no epoch boundary, where a Trainer's partial last batch would
    # differ from a loop that wraps around, and the loss curves would part for a reason that is not a bug
    g.add_argument("--train-family", type=int, default=4800, help="examples of each single-family train split")
    g.add_argument("--pairs", default="last",
                   help="families that get preference files tb_pref_/tb_kto_/tb_pref_eval_<family>.jsonl")
    g.add_argument("--prompts", default="add", help="families that get GRPO prompt files tb_prompts_<family>.jsonl")
    g.add_argument("--prompt-rows", type=int, default=1000, help="rows of each tb_prompts_<family>.jsonl")
    g.add_argument("--eval", type=int, default=100, help="held-out eval examples per family")
    g.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write(a.out, [f for f in a.families.split(",") if f], a.train, a.eval, a.seed,
                  [f for f in a.single.split(",") if f], a.train_family, [f for f in a.pairs.split(",") if f],
                  [f for f in a.prompts.split(",") if f], a.prompt_rows)
    for path in paths:
        print(path)
    return 0
