"""Build a sweep's inputs once, in a process of its own: ``python -m harness.running.prepare SPEC.json``.

Writes the checkpoint (random weights when asked, cached) and the dataset JSONL every framework reads,
then prints a JSON line ``{"checkpoint": ..., "dataset_path": ...}``. Kept out of the runner's process so the
runner never holds GPU memory or heavy imports while it measures others.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from harness.inputs import data, models, preference, warmstart
from harness.spec.scenario import scenario_from_dict


def prepare(sc, data_dir: Path) -> dict:
    ckpt = models.resolve_checkpoint(sc.model, device=sc.hardware.device)
    if sc.model.warm_start is not None:  # every framework loads the warm-started copy
        ckpt = warmstart.warm_checkpoint(ckpt, sc.model.warm_start, sc.model.dtype, sc.source_path,
                                         sc.hardware.device)
    data_dir.mkdir(parents=True, exist_ok=True)
    ds_path = data_dir / "dataset.jsonl"
    if not ds_path.exists():
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
