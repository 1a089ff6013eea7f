"""Conversations through the axolotl adapter's SFT path: Axolotl's custom pre-tokenised dataset.

On the CPU: the rows and the dataset entry the adapter writes for messages and sharegpt rows (the harness's ids
and labels, every assistant turn trained). With the axolotl environment (``python -m harness env create axolotl``
or its bundle; skipped otherwise): Axolotl's own config validation and SFT data loader take the file as it is, the
same ids and labels in file order.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from adapters_for_tools.axolotl import config as ax_config
from harness.inputs.data import IGNORE_INDEX, tokenize_example, write_jsonl
from harness.running import envs
from harness.spec.scenario import parse_scenario
from tests.objective_scenario import needs_env, objective_yaml

REPO = Path(__file__).resolve().parents[2]
MULTI = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                  {"role": "assistant", "content": "done"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
]


def _sc():
    return parse_scenario(objective_yaml("t_ax", "{kind: sft}", "[axolotl]", "cuda", baseline="axolotl",
                                         data="{source: synthetic, seq_len: 64}",
                                         model="{preset: tiny-llama, weights: random, dtype: float32}"),
                          str(REPO / "scenarios" / "t.yaml"))


def test_conversations_are_the_harness_ids_and_labels():
    from harness.inputs.models import build_tokenizer  # transformers: heavy

    tok = build_tokenizer(300)
    rows = ax_config.tokenised_rows(MULTI, "messages", tok, 128)
    for raw, row in zip(MULTI, rows, strict=True):
        want = tokenize_example(tok, raw, "messages", 128)
        assert row == {"input_ids": want["input_ids"], "attention_mask": [1] * len(want["input_ids"]),
                       "labels": want["labels"]}
    # both assistant turns of the first row bear loss, and its <eos>
    trained = tok.decode([label for label in rows[0]["labels"] if label != IGNORE_INDEX])
    assert trained == "yo\n" + "done\n" + tok.eos_token  # each turn's closing newline is part of it
    assert len(ax_config.tokenised_rows(MULTI, "messages", tok, 50)[0]["input_ids"]) == 50  # cut at seq_len


@needs_env("axolotl")
def test_axolotl_takes_the_pre_tokenised_conversations_as_they_are(tmp_path):
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    ckpt = prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
    from transformers import AutoTokenizer  # heavy

    rows = ax_config.tokenised_rows(MULTI * 3, "messages", AutoTokenizer.from_pretrained(ckpt), 64)
    write_jsonl(rows, tmp_path / "axolotl_sft_dataset.jsonl")
    cfg = ax_config.native_config(_sc(), tmp_path / "w", str(ckpt), tmp_path / "axolotl_sft_dataset.jsonl",
                                  "messages")
    script = """
import json, sys
from axolotl.cli.args import TrainerCliArgs
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
from axolotl.utils.dict import DictDefault
parsed = load_cfg(DictDefault(json.loads(sys.argv[1])))
ds = load_datasets(cfg=parsed, cli_args=TrainerCliArgs()).train_dataset
print("RESULT " + json.dumps([{k: ds[i][k] for k in ("input_ids", "labels")} for i in range(len(ds))]))
"""
    env_spec = envs.resolve("axolotl")
    env = dict(os.environ, **env_spec.env_vars, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([*env_spec.pythonpath, str(REPO)]), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([env_spec.python, "-c", script, json.dumps(cfg)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert got == [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


@pytest.mark.gpu
@needs_env("axolotl")
def test_conversations_on_the_gpu_train_the_tokens_hf_trains(tmp_path, monkeypatch):
    """Multi-turn messages through Axolotl's SFT path beside hf: the same tokens and loss tokens at every step, a
    valid run (nothing it could not honour), and the loss curve of hf."""
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    write_jsonl(MULTI * 16, tmp_path / "m.jsonl")
    text = objective_yaml("t_ax_gpu", "{kind: sft}", "[hf, axolotl]", "cuda", baseline="hf",
                          data=f"{{source: jsonl, path: {tmp_path / 'm.jsonl'}, format: messages, seq_len: 96}}",
                          model="{preset: small-llama-30m, weights: random, dtype: float32}", method="{kind: full}")
    sweep = runner.run_sweep(parse_scenario(text, str(tmp_path / "t.yaml")), tmp_path / "results", new=True,
                             quiet=True)
    res = {fw: runner.load_result(sweep, fw, 0) for fw in ("hf", "axolotl")}
    for fw, r in res.items():
        assert r["status"] == "ok" and r["valid"], (fw, r.get("reason"), r.get("invalid_reasons"))
    hf, ax = res["hf"]["steps"], res["axolotl"]["steps"]
    assert [(s["tokens"], s["loss_tokens"]) for s in ax] == [(s["tokens"], s["loss_tokens"]) for s in hf]
    for a, b in zip(ax, hf, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3), (a["loss"], b["loss"])
