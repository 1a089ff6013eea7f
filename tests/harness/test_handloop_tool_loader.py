"""The plain loop on a tool's own data loader, as the Unsloth loop runs it: here TRL's ``SFTTrainer`` (the trainer
Unsloth patches) in padding-free mode, on the CPU in the trl environment (skipped without it).

The loop reads the trainer's loader through ``loader_steps``, trains with ``trainer_loop.train`` and reads the
geometry by the meter's rules: each micro-batch is one padding-free row holding two samples, counted as two samples
of their own lengths, with exactly the tokens the trainer's tokenisation gave them.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from handloop_scenario import HANDLOOP_SCENARIO

from harness.inputs import data, models
from harness.running import envs
from harness.running.envs import worker_environment
from harness.spec.scenario import load_scenario

pytestmark = pytest.mark.skipif(not envs.resolve("trl").ready,
                                reason="trl environment not created: run `python -m harness env create trl`")

# the hand-loop tests' tiny scenario, run through TRL's loader without checkpointing
SCENARIO = (HANDLOOP_SCENARIO.replace("name: handloop_test", "name: tool_loader_test")
            .replace("gradient_checkpointing: true", "gradient_checkpointing: false")
            .replace("frameworks: [hf, tunebench]", "frameworks: [trl]"))

# Runs in the trl environment: argv = scenario, checkpoint, rows JSONL, output JSON.
SCRIPT = '''
import json
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from harness.measuring.handloop.common import loader_steps, read_back_transformers
from harness.measuring.handloop.knobs import HfKnobs
from harness.measuring.handloop.trainer_loop import train
from harness.spec.scenario import load_scenario

scenario, ckpt, rows, out = sys.argv[1:]
sc = load_scenario(scenario)
t = sc.train
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
args = SFTConfig(output_dir=str(Path(out).parent / "trainer"), report_to="none", use_cpu=True,
                 per_device_train_batch_size=t.micro_batch, gradient_accumulation_steps=t.grad_accum,
                 max_steps=t.steps, padding_free=True, max_length=None, dataset_text_field="text",
                 dataset_num_proc=1, train_sampling_strategy="sequential", shuffle_dataset=False)
trainer = SFTTrainer(model=model, processing_class=tok, args=args,
                     train_dataset=load_dataset("json", data_files=rows, split="train"))
feed = loader_steps(trainer.get_train_dataloader(), t.grad_accum, t.steps)
log, _ = train(trainer.model, sc, "cpu", feed, HfKnobs(), lambda m, o: read_back_transformers(m, o, lambda _: {}))
lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
Path(out).write_text(json.dumps({"geometry": log.geometry(sc.data.packing), "tokens": log.tokens,
                                 "losses": log.losses, "lengths": lengths}))
'''


def test_the_loop_trains_on_a_trainers_padding_free_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tool_loader_test.yaml"
    path.write_text(SCENARIO)
    sc = load_scenario(path)
    ckpt = models.resolve_checkpoint(sc.model, device="cpu")
    rows = tmp_path / "rows.jsonl"
    data.write_jsonl(data.build_examples(sc)[0], rows)
    (tmp_path / "loop.py").write_text(SCRIPT)
    env = worker_environment(envs.resolve("trl"))
    done = subprocess.run([envs.resolve("trl").python, str(tmp_path / "loop.py"), str(path), str(ckpt), str(rows),
                           str(tmp_path / "out.json")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    lengths, per_step = got["lengths"], sc.train.micro_batch * sc.train.grad_accum
    assert len(set(lengths)) > 1  # uniform lengths: samples of their own length, not padded to one width
    # each step: its four samples' tokens exactly (no padding in padding-free rows), in the trainer's order
    assert got["tokens"] == [sum(lengths[s * per_step:(s + 1) * per_step]) for s in range(sc.train.steps)]
    assert got["geometry"] == {"micro_batch": 2, "grad_accum": 2, "seq_len": max(lengths[:per_step * 3]),
                               "tokens_per_step": sum(lengths[:per_step * 3]) / 3, "padding_free_rows": True}
    assert len(got["losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in got["losses"])


