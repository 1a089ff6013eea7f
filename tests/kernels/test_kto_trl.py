"""tunebench's KTO against TRL 1.16's ``KTOTrainer`` itself: same tiny model, same adapter weights, same rows.

TRL runs in its own environment (skipped without it), in a subprocess: its collator on the rows with the KL
completions its ``_prepare_dataset`` adds (each row's completion moved one on within the micro-batch), then
``KTOTrainer.compute_loss`` with the trainer's own PEFT wrapping (its reference: the base with the adapter disabled)
holding the adapter weights our model holds, and the metrics it logs for that micro-batch. float32 on the CPU:
``1e-5``, as test_preference_trl.py.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from test_kto import toy_rows
from test_preference_trainer import ATOL, grads_by_peft_name, lora_model

from harness.running import envs
from kernels.trainer.config import ObjectiveOptions
from kernels.trainer.kto import collate_labelled, kto_micro_batch_loss
from kernels.trainer.save import save_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not envs.resolve("trl").ready,
                                 reason="trl environment not created: run `python -m harness env create trl`")]

CASES = {"kto": {"loss_type": "kto", "max_length": None, "desirable_weight": 1.0, "undesirable_weight": 1.0},
         "kto-cut-weighted": {"loss_type": "kto", "max_length": 10, "desirable_weight": 1.0,
                              "undesirable_weight": 1.33},
         "apo": {"loss_type": "apo_zero_unpaired", "max_length": None, "desirable_weight": 0.8,
                 "undesirable_weight": 1.0}}
BETA = 0.5
LOGGED = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")

# Runs in the trl environment: argv = checkpoint, adapter dir, spec JSON, output file.
TRL_SCRIPT = '''
import json
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl import KTOConfig, KTOTrainer

ckpt, adapter, spec_path, out = sys.argv[1:]
spec = json.loads(open(spec_path).read())
rows = spec["rows"]
tok = AutoTokenizer.from_pretrained(ckpt)
text = Dataset.from_list([{"prompt": "a", "completion": " b", "label": True},
                          {"prompt": "a", "completion": " c", "label": False}])
lora = json.loads(open(f"{adapter}/adapter_config.json").read())
peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                         target_modules=lora["target_modules"], use_dora=lora["use_dora"], task_type="CAUSAL_LM")
results = {}
for name, case in spec["cases"].items():
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    args = KTOConfig(output_dir=tempfile.mkdtemp(), beta=spec["beta"], loss_type=case["loss_type"], report_to=[],
                     use_cpu=True, max_length=case["max_length"], per_device_train_batch_size=len(rows),
                     desirable_weight=case["desirable_weight"], undesirable_weight=case["undesirable_weight"],
                     disable_dropout=True)
    trainer = KTOTrainer(model=model, args=args, train_dataset=text, processing_class=tok, peft_config=peft_config)
    result = set_peft_model_state_dict(trainer.model, load_file(f"{adapter}/adapter_model.safetensors"))
    assert not result.unexpected_keys, result.unexpected_keys
    completions = [r["completion_ids"] for r in rows]
    features = [dict(r, KL_completion_ids=kl) for r, kl in zip(rows, [completions[-1], *completions[:-1]])]
    if case["loss_type"] != "kto":
        features = [{k: v for k, v in f.items() if k != "KL_completion_ids"} for f in features]
    batch = trainer.data_collator(features)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    results[name] = {"loss": loss.detach(), "grads": grads, "metrics": metrics}
torch.save(results, out)
'''


@pytest.fixture(scope="module")
def trl_results(tiny_llama_fp32, tmp_path_factory):  # noqa: ANN001, ANN201
    work = tmp_path_factory.mktemp("trl_kto")
    model = lora_model(tiny_llama_fp32, seed=2)  # adapters whose KL estimate is positive on these rows
    save_peft_adapter(model, work / "adapter", tiny_llama_fp32)
    rows = toy_rows()
    (work / "spec.json").write_text(json.dumps({"rows": rows, "beta": BETA, "cases": CASES}))
    (work / "trl_kto.py").write_text(TRL_SCRIPT)
    env = envs.resolve("trl")
    done = subprocess.run([env.python, str(work / "trl_kto.py"), str(tiny_llama_fp32), str(work / "adapter"),
                           str(work / "spec.json"), str(work / "out.pt")], cwd=work, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(env.pythonpath),
                                                **env.env_vars))
    assert done.returncode == 0, done.stderr[-4000:]
    return rows, torch.load(work / "out.pt")


@pytest.mark.parametrize("case", list(CASES))
def test_kto_equals_trl(tiny_llama_fp32, trl_results, case):  # noqa: ANN001
    rows, theirs = trl_results
    theirs = theirs[case]
    o = ObjectiveOptions(kind="kto", beta=BETA, **CASES[case])
    model = lora_model(tiny_llama_fp32, seed=2)
    loss, stats = kto_micro_batch_loss(model, collate_labelled(rows, o), o)
    loss.backward()
    torch.testing.assert_close(loss, theirs["loss"], atol=ATOL, rtol=0)
    grads = grads_by_peft_name(model)
    assert set(grads) == set(theirs["grads"])
    for name, g in theirs["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=ATOL, rtol=1e-4, msg=name)
    for name in LOGGED:
        assert float(stats[name]) == pytest.approx(theirs["metrics"][name], abs=ATOL), name
    if case == "kto":
        assert theirs["metrics"]["kl"] > 0  # the KL term is exercised, not clamped away
