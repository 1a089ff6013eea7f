"""A warm start: the checkpoint trained briefly on supervised data once, before any framework loads it.

Scenario ``model.warm_start`` (``harness.spec.objective.WarmStartSpec``). With no model hub the checkpoints are
random, and an RL objective cannot start there: GRPO rewards what the model generates, and a random model
never generates a right answer, so every reward is 0 and nothing trains. The warm start gives every framework the
same starting point that already answers some prompts: the sweep's preparation (``harness.running.prepare``)
trains the checkpoint with a plain PyTorch loop (AdamW, constant learning rate, the rows in file order, gradients
clipped at 1.0), in float32, and saves it in the scenario's dtype beside the random one, keyed by what made it
(the checkpoint, the settings, the data file's digest), so a sweep builds it once and later sweeps reuse it.
Not a measurement: nothing of it is timed or stored with the runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from harness.inputs.data import collate, detect_format, read_jsonl, resolve_path, tokenize_example


def warm_dir(base: Path, spec: Any, data_file: Path) -> Path:
    """Where the warm checkpoint of ``base`` under ``spec`` lives (beside ``base``)."""
    blob = json.dumps({"base": base.name, "spec": spec.model_dump(mode="json"),
                       "data": hashlib.sha256(data_file.read_bytes()).hexdigest()}, sort_keys=True)
    return base.parent / f"{base.name}-warm-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def warm_checkpoint(base: Path | str, spec: Any, dtype: str, source: str | None, device: str = "cpu") -> Path:
    """Build (once) and return the warm-started copy of checkpoint ``base``.

    Args:
        base: the checkpoint directory (random weights, or the user's).
        spec: the scenario's ``model.warm_start``.
        dtype: the scenario's ``model.dtype``: the dtype the copy is saved in.
        source: the scenario file (``spec.data`` is relative to it).
        device: ``cuda`` or ``cpu``.

    Returns:
        The directory of the warm checkpoint (weights, config, the tokenizer of ``base``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    data_file = resolve_path(spec.data, source)
    out = warm_dir(base, spec, data_file)
    if (out / "config.json").exists():
        return out
    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = read_jsonl(data_file)
    fmt = detect_format(rows[0])  # any SFT format the harness reads (checked at validation)
    examples = [tokenize_example(tokenizer, r, fmt, spec.seq_len) for r in rows]
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    for step in range(spec.steps):
        start = step * spec.micro_batch
        batch = collate([examples[(start + i) % len(examples)] for i in range(spec.micro_batch)],
                        tokenizer.pad_token_id)
        loss = model(**{k: v.to(dev) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        shutil.copytree(base, tmp, dirs_exist_ok=True)  # tokenizer and the harness's notes of the base
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        (tmp / "warm_start.json").write_text(json.dumps({"base": str(base), **spec.model_dump(mode="json"),
                                                         "final_loss": float(loss.detach())}, indent=1))
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # another sweep built the same one first: as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

