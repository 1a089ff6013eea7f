"""lm-eval loader for tunebench's synthetic tasks (copied beside the task YAMLs by ``python -m harness.inputs.tasks``).

lm-eval resolves ``!function tb_tasks.load`` relative to the YAML, and this module resolves the JSONL relative
to itself, so the task directory works from any working directory (``datasets.load_dataset('json', ...)``
would resolve relative paths against the cwd, and it caches into ``~/.cache``).
"""

import json
from pathlib import Path


def load(file: str, family: str | None = None, **_ignored):
    """The eval split as a ``datasets.DatasetDict`` with one ``test`` split, optionally one family only."""
    import datasets

    with open(Path(__file__).parent / file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if family:
        rows = [r for r in rows if r["family"] == family]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
