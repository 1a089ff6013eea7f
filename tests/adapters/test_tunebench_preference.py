"""The tunebench adapter's DPO and ORPO: TRL's tokenisation of the pairs, and runs through the harness worker
(in process, CPU, tiny model)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from adapters_for_tools.tunebench.pairs import dpo_pairs, orpo_pairs
from harness.inputs.models import build_tokenizer
from harness.running import envs
from harness.spec.scenario import parse_scenario
from tests.worker_run import run_first_row

ROWS = [{"prompt": "ab", "chosen": "cd", "rejected": "efg"},
        {"prompt": "hello ", "chosen": "world", "rejected": "there"},
        {"prompt": "a long prompt", "chosen": "x", "rejected": "y"}]


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return build_tokenizer(320)


def _bytes(text: str) -> list[int]:
    return list(text.encode())  # the generated tokenizer: token id = byte value


@pytest.mark.parametrize("tokenise", [dpo_pairs, orpo_pairs])
def test_pairs_are_bos_prompt_completion_eos(tok, tokenise):  # noqa: ANN001
    """Both objectives feed ``<bos> + prompt`` and ``completion + <eos>`` (the harness's rule for every tool)."""
    pairs = tokenise(ROWS, tok, 64)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert pairs[1] == {"prompt_ids": [bos, *_bytes("hello ")], "chosen_ids": [*_bytes("world"), eos],
                        "rejected_ids": [*_bytes("there"), eos]}
    assert len(pairs) == len(ROWS)


def test_truncation_follows_each_trl_trainer(tok):  # noqa: ANN001
    """DPO cuts each sequence to max_length from the end and drops a pair whose prompt fills it; ORPO cuts the
    completions so that prompt + completion fits, and keeps the pair (with empty completions)."""
    bos = tok.bos_token_id
    dpo = dpo_pairs(ROWS, tok, 5)
    assert [p["prompt_ids"] for p in dpo] == [[bos, *_bytes("ab")]]  # the other prompts fill 5 tokens
    assert dpo[0]["chosen_ids"] == _bytes("cd") and dpo[0]["rejected_ids"] == _bytes("ef")
    orpo = orpo_pairs(ROWS, tok, 5)
    assert len(orpo) == 3 and orpo[0]["chosen_ids"] == _bytes("cd") and orpo[2]["chosen_ids"] == []


SCENARIO = """
version: 1
name: tb_pref_test
model: {{preset: tiny-llama, weights: random, dtype: float32, seed: 0}}
method: {{kind: lora, lora_r: 4, lora_alpha: 8, target_modules: all-linear}}
objective: {{kind: {kind}, beta: 0.2}}
data: {{source: synthetic, seq_len: 48, lengths: uniform, min_len: 12}}
train: {{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}}
hardware: {{device: cpu}}
frameworks: [{{name: tunebench, overrides: {{fused_ce_chunk: 16, pair_layout: {layout}}}}}]
"""


@pytest.fixture
def cpu_references(monkeypatch):  # noqa: ANN001, ANN201
    """The ops' PyTorch references on the CPU (tests/conftest.py switches the Triton interpreter on for the session:
    minutes per run instead of seconds), tiny matmuls single-threaded, as tests/kernels' trainer tests run."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("cpu_references")
@pytest.mark.parametrize(("kind", "layout"), [("dpo", "packed"), ("dpo", "shared_prompt"), ("orpo", "padded")])
def test_worker_trains_the_objective(tmp_path, monkeypatch, kind, layout):  # noqa: ANN001
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    sc = parse_scenario(SCENARIO.format(kind=kind, layout=layout))
    res = run_first_row(sc, tmp_path)
    work = tmp_path / "work"
    eff = res["effective"]
    assert (eff["objective"], eff["beta"], eff["reference"]) == (kind, 0.2, "adapter_disabled" if kind == "dpo"
                                                                  else "none")
    rewards = res["extra"]["train_rewards"]
    assert [r["step"] for r in rewards] == [1, 2, 3] and all(0 <= r["accuracy"] <= 1 for r in rewards)
    if kind == "dpo":
        # the policy starts as the reference: margin 0, loss log 2
        assert res["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rewards[0]["margin"] == 0
        assert eff["loss_type"] == "sigmoid"
        ref = res["extra"]["reference_pass"]
        assert ref["forwards"] == 6 and ref["tokens_per_step_mean"] == pytest.approx(
            sum(s["tokens"] for s in res["steps"]) / 3)
    else:
        assert "reference_pass" not in res["extra"] and res["steps"][0]["loss"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "data" / "dataset.jsonl")]
    pairs = (dpo_pairs if kind == "dpo" else orpo_pairs)(rows, build_tokenizer(320), 48)
    first_step = pairs[:4]  # micro_batch 2 x grad_accum 2, in file order
    assert res["steps"][0]["tokens"] == sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                            for p in first_step)
    assert (work / "output" / "adapter_model.safetensors").exists()
    saved = json.loads((work / "tunebench_trainer.json").read_text())  # the run's native config
    assert saved["objective"]["kind"] == kind and saved["objective"]["pair_layout"] == layout


TRL_TOKENS = '''
import json
import sys
import tempfile

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ckpt, rows_path, max_length, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = json.loads(open(rows_path).read())
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt)
work = tempfile.mkdtemp()
dpo = DPOTrainer(model=model, args=DPOConfig(output_dir=work, report_to=[], use_cpu=True, max_length=max_length),
                 train_dataset=Dataset.from_list(rows), processing_class=tok)
batch = dpo.data_collator([dpo.train_dataset[i] for i in range(len(dpo.train_dataset))])
n = len(dpo.train_dataset)
result = {"dpo": []}
for i in range(n):
    seqs = []
    for r in (i, n + i):
        keep = batch["attention_mask"][r].bool()
        seqs.append((batch["input_ids"][r][keep].tolist(), int(batch["completion_mask"][r][keep].argmax())))
    result["dpo"].append(seqs)
orpo = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt),
                   args=ORPOConfig(output_dir=work, report_to=[], use_cpu=True, max_length=max_length),
                   train_dataset=Dataset.from_list(rows), processing_class=tok)
result["orpo"] = [[(ex[f"{side}_input_ids"], sum(1 for x in ex[f"{side}_labels"] if x == -100))
                   for side in ("chosen", "rejected")] for ex in orpo.train_dataset]
open(out, "w").write(json.dumps(result))
'''


@pytest.mark.slow
@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
def test_pairs_equal_trls_own_tokenisation(tmp_path, monkeypatch, tok):  # noqa: ANN001
    """dpo_pairs / orpo_pairs give the token ids and prompt/completion split TRL 1.16's trainers build from the
    same rows and max_length (run in the trl environment)."""
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
    rows = [*ROWS, {"prompt": "Q: 2+2?\n### Response:\n", "chosen": "4", "rejected": "five"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "trl_tokens.py").write_text(TRL_TOKENS)
    env = envs.resolve("trl")
    done = subprocess.run([env.python, str(tmp_path / "trl_tokens.py"), str(ckpt), str(tmp_path / "rows.json"), "12",
                           str(tmp_path / "out.json")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(env.pythonpath), **env.env_vars))
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    for name, tokenise in (("dpo", dpo_pairs), ("orpo", orpo_pairs)):
        ours = [[(p["prompt_ids"] + p[f"{side}_ids"], len(p["prompt_ids"])) for side in ("chosen", "rejected")]
                for p in tokenise(rows, tok, 12)]
        assert ours == [[tuple(s) for s in pair] for pair in theirs[name]], name
