"""Synthetic instruction tasks: train data for the quality scenarios and matching local lm-eval tasks.

``python -m harness.inputs.tasks generate --out scenarios/tasks`` writes (see :mod:`harness.inputs.tasks.files`):

- ``tb_train.jsonl``: Alpaca rows ``{instruction, input, output}``, all families interleaved, and
  ``tb_train_<family>.jsonl`` one family each (the scenarios' ``data.path``);
- ``tb_eval.jsonl``: the held-out split, with the exact prompt the model sees at training time, the
  multiple-choice choices and the gold index;
- lm-eval task YAMLs ``tb_<family>_gen`` (generate_until, exact_match) and ``tb_<family>_mc``
  (multiple_choice, acc) per family, and ``tb_mix_gen`` / ``tb_mix_mc`` over all families;
- ``tb_tasks.py``: the loader those YAMLs name;
- for the preference and RL objectives (:mod:`harness.inputs.tasks.pairs`): ``tb_pref_<family>.jsonl``
  (prompt/chosen/rejected pairs from the family's single-family examples), ``tb_kto_<family>.jsonl`` (the same
  as good/bad labelled completions) and ``tb_pref_eval_<family>.jsonl`` (pairs from the held-out split: reward
  accuracy) for each ``--pairs`` family; ``tb_prompts_<family>.jsonl`` (prompt/answer rows, rewarded by exact
  match) for each ``--prompts`` family.

The generator (:mod:`harness.inputs.tasks.generator`) is deterministic in its seed.
"""

from harness.inputs.tasks.generator import FAMILIES, Example, generate

__all__ = ["FAMILIES", "Example", "generate"]
