"""Reward accuracy of a trained output on held-out pairs: ``python -m harness.analysis.reward REWARD_SPEC.json``.

The runner starts this in the base environment after a run finished ``ok`` when the scenario's objective names
``eval_pairs`` (prompt/chosen/rejected JSONL), so every framework's saved output is scored by the same code on the
same pairs, from the files it saved (a PEFT adapter over the shared checkpoint, or a full checkpoint). The spec
(JSON) holds ``scenario`` (resolved dict), ``scenario_source``, ``checkpoint`` (the starting model every framework
loaded), ``output_dir`` and ``work_dir``. It writes ``work_dir/reward_result.json``, which the runner stores as
``result["reward_eval"]``::

    {"status": "ok" | "error", "error": str,
     "pairs": int, "beta": float, "eval_pairs": str,
     "reward_accuracy": float, "reward_margin": float,            # the trained output against the reference
     "likelihood_accuracy": float,                                # the trained output alone
     "baseline_likelihood_accuracy": float,                       # the untrained checkpoint alone
     "chosen_logp_mean": float, "rejected_logp_mean": float, "eval_s": float}

Definitions (``log pi(y|x)``: the sum of the log-probabilities of a completion's tokens and its ``<eos>`` after
``<bos> + prompt``, tokenised as TRL tokenises pairs: prompt alone, then prompt + completion, the completion
starting where the two diverge):

- reward ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))``, ``pi_ref`` the starting checkpoint and ``beta`` the
  scenario's: the implicit reward DPO trains (for ORPO and KTO the same yardstick, so objectives compare);
- reward accuracy: the fraction of pairs with ``r(chosen) > r(rejected)`` (strictly, as TRL's
  ``rewards/accuracies``); reward margin: the mean of ``r(chosen) - r(rejected)``;
- likelihood accuracy: the fraction with ``log pi(chosen|x) > log pi(rejected|x)``. For the untrained model every
  reward is 0 (it is its own reference), so its reward accuracy says nothing; its likelihood accuracy is the
  baseline a trained model's is compared with (chance is 0.5 only when chosen and rejected are alike in length
  and frequency).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from harness.analysis.entry import spec_main
from harness.inputs.data import resolve_path
from harness.inputs.preference import read_pairs
from harness.spec.scenario import scenario_from_dict

BATCH = 32  # sequences per forward: held-out sets are a few hundred short pairs


def token_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:  # noqa: ANN001
    """``(ids of <bos> + prompt + completion + <eos>, index of the first completion token)``, as TRL's DPO
    tokenises a pair (the tokenizer's own special tokens, the EOS text appended to the completion)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return full, start


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], device: str) -> list[float]:  # noqa: ANN001
    """``log pi(completion | prompt)`` for each row, in batches of :data:`BATCH` (right-padded)."""
    import torch

    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), BATCH):
        rows = [token_ids(tokenizer, p, c) for p, c in zip(prompts[i:i + BATCH], completions[i:i + BATCH],
                                                             strict=True)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (r, start) in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
            scored[j, start: len(r)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        out += (logp * scored[:, 1:].to(device)).sum(-1).tolist()
    return out


def score(chosen: list[float], rejected: list[float], ref_chosen: list[float], ref_rejected: list[float],
          beta: float) -> dict[str, float]:
    """Reward and likelihood accuracy from the four log-probability lists (module docstring)."""
    n = len(chosen)
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected,
                                                                   strict=True)]
    return {"pairs": n, "reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "likelihood_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
            "baseline_likelihood_accuracy": sum(c > r for c, r in zip(ref_chosen, ref_rejected, strict=True)) / n,
            "chosen_logp_mean": sum(chosen) / n, "rejected_logp_mean": sum(rejected) / n}


def load_model(checkpoint: str, output_dir: str | None, dtype: str, device: str):  # noqa: ANN201
    """The starting checkpoint (``output_dir`` None), or the trained output: a PEFT adapter over it, or a full
    checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    path = output_dir if output_dir and not (Path(output_dir) / "adapter_config.json").exists() else checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    if output_dir and (Path(output_dir) / "adapter_config.json").exists():
        from peft import PeftModel  # heavy optional dependency: only for a PEFT output

        model = PeftModel.from_pretrained(model, output_dir)
    return model.eval()


def evaluate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Score one finished run as described by the runner's spec; returns the ``reward_result.json`` dict."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    sc = scenario_from_dict(spec["scenario"], spec.get("scenario_source") or "<resolved>")
    if not spec.get("output_dir"):
        raise ValueError("the run saved no output (output_dir is empty): nothing to score")
    path = resolve_path(sc.objective.eval_pairs, spec.get("scenario_source"))
    pairs = read_pairs(path)
    device = "cuda" if sc.hardware.device == "cuda" else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    prompts = [p["prompt"] for p in pairs]
    logps = {}
    for name, out_dir in (("ref", None), ("trained", spec["output_dir"])):
        model = load_model(spec["checkpoint"], out_dir, sc.model.dtype, device)
        logps[name] = (completion_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], device),
                       completion_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], device))
        del model
    result = {"status": "ok", "beta": sc.objective.beta, "eval_pairs": str(path),
              **score(*logps["trained"], *logps["ref"], sc.objective.beta)}
    result["eval_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: score, and always leave a ``reward_result.json`` (an error is a result too)."""
    return spec_main(argv, "harness.analysis.reward", "reward_result.json", evaluate_spec)


if __name__ == "__main__":
    sys.exit(main())
