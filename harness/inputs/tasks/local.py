"""The local lm-eval tasks shipped in ``scenarios/tasks/``: where they are and what they are called.

Light (PyYAML only): scenario validation resolves ``eval.tasks`` against these names before anything trains, and
the evaluator registers the same directory with lm-eval.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from harness.common.paths import REPO_ROOT

LOCAL_TASK_DIR = REPO_ROOT / "scenarios" / "tasks"


def local_task_names(task_dir: Path = LOCAL_TASK_DIR) -> set[str]:
    """Names of the local lm-eval tasks shipped in ``task_dir`` (one ``task:`` per YAML)."""

    class _Loader(yaml.SafeLoader):
        pass

    # lm-eval's `!function` tag: irrelevant for reading the task name
    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names = set()
    for p in sorted(task_dir.glob("*.yaml")):
        cfg = yaml.load(p.read_text(), Loader=_Loader) or {}
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            names.add(cfg["task"])
    return names
