"""Checkpoints and rows for the trainer tests that compare against transformers and PEFT."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def preset_checkpoints(root: Path, presets: tuple[str, ...], make: Callable[[str, Path], Path] | None = None
                       ) -> Iterator[dict[str, Path]]:
    """A module's checkpoints, one per preset under ``root`` (``make(preset, out_dir)``, default
    :func:`perturbed_checkpoint`), built with a checkpoint cache private to ``root``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(root / "cache"))
        yield {p: (make or perturbed_checkpoint)(p, root / p) for p in presets}


def perturbed_checkpoint(preset: str, out_dir: Path, seed: int = 0,
                         edit: Callable[[str, torch.nn.Parameter], None] | None = None,
                         config: dict | None = None) -> Path:
    """A generated checkpoint of ``preset`` whose norms and biases are random too (generated ones are all ones and
    zeros, which would hide a norm or bias applied wrongly); ``edit(name, parameter)`` changes further parameters,
    ``config`` sets config values, before it is saved to ``out_dir`` with the tokenizer files."""
    from transformers import AutoModelForCausalLM  # heavy: only the tests that build a checkpoint

    from harness.inputs.models import get_preset, prepare_random_checkpoint

    src = prepare_random_checkpoint(get_preset(preset), "float32", seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif edit is not None:
                edit(name, p)
    for key, value in (config or {}).items():
        setattr(model.config, key, value)
    model.save_pretrained(out_dir)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, Path(out_dir) / f.name)
    return Path(out_dir)


def byte_rows(n: int = 8) -> list[dict]:
    """``n`` rows of lowercase-letter bytes between BOS 256 and EOS 257, 10 + 3i long, labels all but the first."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = [256] + torch.randint(97, 123, (10 + 3 * i,), generator=g).tolist() + [257]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows
