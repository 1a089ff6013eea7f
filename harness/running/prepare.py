"""Build a sweep's inputs once, in a process of its own: ``python -m harness.running.prepare SPEC.json``.

Writes the checkpoint (random weights when asked, cached) and the dataset JSONL every framework reads,
then prints a JSON line ``{"checkpoint": ..., "dataset_path": ...}``. Kept out of the runner's process so the
runner never holds GPU memory or heavy imports while it measures others.

A dataset is cached too (``<cache>/datasets/<key>/``), keyed by everything it is made from: the scenario less its
name, description, framework rows and memory budget, the data file's bytes (JSONL), the checkpoint's files other than
its weights (the tokenizer), and the code that builds it (ours, and transformers' version). The probes of a memory
frontier (one sweep each, a row under a budget at a value) then share one build per value instead of importing a
tokenizer each, seconds a probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.common.digest import files_digest
from harness.inputs import data, models, preference, warmstart
from harness.spec.scenario import scenario_from_dict

DATA_FILES = ("dataset.meta.json", "dataset.jsonl")  # the JSONL last: a data folder holding it is whole
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt"}


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def dataset_key(sc, ckpt: Path | str) -> str | None:  # noqa: ANN001
    """The cache key of ``sc``'s dataset built with checkpoint ``ckpt``'s tokenizer, or None where it cannot be
    pinned down (a checkpoint that is not a local folder: a hub name's files are not ours to fingerprint)."""
    folder = Path(ckpt)
    if not folder.is_dir():
        return None
    d = sc.to_dict()
    for k in ("name", "description", "frameworks"):
        d.pop(k, None)
    d.get("hardware", {}).pop("memory_budget_gib", None)
    parts = [json.dumps(d, sort_keys=True, default=str)]
    if sc.data.source == "jsonl":
        parts.append(files_digest([data.resolve_path(sc.data.path, sc.source_path)]))
    parts.append(files_digest(f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix not in WEIGHT_SUFFIXES))
    parts.append(files_digest(Path(m.__file__) for m in (data, preference, sys.modules[__name__])))
    parts.append(f"transformers {_version('transformers')}")  # the tokenizer's code: rows kept, the widest row
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _from_cache(key: str | None, data_dir: Path) -> bool:
    """Copy a cached dataset into ``data_dir``; whether there was one."""
    src = models.cache_root() / "datasets" / key if key else None
    if src is None or not all((src / n).is_file() for n in DATA_FILES):
        return False
    for n in DATA_FILES:
        tmp = data_dir / f".{n}.tmp"
        shutil.copyfile(src / n, tmp)
        os.replace(tmp, data_dir / n)
    return True


def _to_cache(key: str | None, data_dir: Path) -> None:
    """Store ``data_dir``'s dataset under ``key``: written beside and renamed, so a reader never sees half of it
    (where another process stored the same key first, its copy stays)."""
    if key is None:
        return
    root = models.cache_root() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
    try:
        for n in DATA_FILES:
            shutil.copyfile(data_dir / n, tmp / n)
        tmp.rename(root / key)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(sc, data_dir: Path) -> dict:
    ckpt = models.resolve_checkpoint(sc.model, device=sc.hardware.device)
    if sc.model.warm_start is not None:  # every framework loads the warm-started copy
        ckpt = warmstart.warm_checkpoint(ckpt, sc.model.warm_start, sc.model.dtype, sc.source_path,
                                         sc.hardware.device)
    data_dir.mkdir(parents=True, exist_ok=True)
    ds_path = data_dir / "dataset.jsonl"
    key = None if ds_path.exists() else dataset_key(sc, ckpt)
    if not ds_path.exists() and not _from_cache(key, data_dir):
        # a preference or RL objective reads its own row form (harness.inputs.preference), SFT the formats of data
        widest = None
        if sc.objective.is_sft:
            from transformers import AutoTokenizer  # heavy: this process only

            tok = AutoTokenizer.from_pretrained(ckpt)
            # jsonl: the rows whose response lies beyond seq_len are left out for every tool
            examples = data.build_examples(sc, tok if sc.data.source == "jsonl" else None)
            if not sc.data.packing:  # what a row may not be cut shorter than (the worker checks each tool's)
                widest = data.widest_row(sc, examples, tok)
        else:
            examples = preference.build_rows(sc)
        meta = data.dataset_meta(sc, examples, widest)
        (data_dir / "dataset.meta.json").write_text(json.dumps(meta, indent=1))
        data.write_jsonl(examples.rows, ds_path)
        _to_cache(key, data_dir)
    digest = hashlib.sha256(ds_path.read_bytes()).hexdigest()[:16]
    meta = json.loads((data_dir / "dataset.meta.json").read_text())
    return {"checkpoint": str(ckpt), "dataset_path": str(ds_path), "dataset_sha256_16": digest, "dataset_meta": meta}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    sc = scenario_from_dict(spec["scenario"], spec.get("scenario_source") or "<resolved>")
    print("TUNEBENCH_PREPARED " + json.dumps(prepare(sc, Path(spec["data_dir"]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
