"""tunebench's DPO and ORPO against TRL 1.16 itself: same tiny model, same adapter weights, same pairs.

TRL runs in its own environment (``python -m harness env create trl``; skipped without it), in a subprocess:
``DPOTrainer.compute_loss`` / ``ORPOTrainer.get_batch_loss_metrics`` on TRL's own collation of the pairs, with the
trainer's own PEFT wrapping (so its reference is the base model with the adapter disabled) and then the adapter
weights our model holds. Both sides float32 on the CPU: losses and LoRA gradients agree to float32 reduction-order
noise (``1e-5``; measured < 1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from test_preference_trainer import grads_by_peft_name, lora_model, toy_pairs

from harness.running import envs
from kernels.trainer.config import ObjectiveOptions
from kernels.trainer.preference import collate_pairs, micro_batch_loss
from kernels.trainer.save import save_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not envs.resolve("trl").ready,
                                 reason="trl environment not created: run `python -m harness env create trl`")]

BETA = 0.5
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down")
LABEL_SMOOTHING = 0.2  # robust's (the others ignore it)

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

from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ckpt, adapter, spec_path, out = sys.argv[1:]
spec = json.loads(open(spec_path).read())
pairs = spec["pairs"]
tok = AutoTokenizer.from_pretrained(ckpt)
text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
results = {}
work = tempfile.mkdtemp()


lora = json.loads(open(f"{adapter}/adapter_config.json").read())
peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                         target_modules=lora["target_modules"], use_dora=lora["use_dora"], task_type="CAUSAL_LM")


def fresh():
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")


def load_adapter(model):
    # after the trainer wrapped the base with a fresh adapter, so that the reference is the base model
    result = set_peft_model_state_dict(model, load_file(f"{adapter}/adapter_model.safetensors"))
    assert not result.unexpected_keys, result.unexpected_keys


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


for loss_type in spec["dpo_loss_types"]:
    model = fresh()
    args = DPOConfig(output_dir=work, beta=spec["beta"], loss_type=[loss_type], report_to=[], use_cpu=True,
                     max_length=None, disable_dropout=True, label_smoothing=spec["label_smoothing"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=text, processing_class=tok, peft_config=peft_config)
    model = trainer.model
    load_adapter(model)
    batch = trainer.data_collator(pairs)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    results[f"dpo-{loss_type}"] = {"loss": loss.detach(), "grads": grads(model)}

model = fresh()
args = ORPOConfig(output_dir=work, beta=spec["beta"], report_to=[], use_cpu=True, max_length=10**6,
                  remove_unused_columns=False, disable_dropout=True)
trainer = ORPOTrainer(model=model, args=args, train_dataset=text, processing_class=tok, peft_config=peft_config)
model = trainer.model
load_adapter(model)
features = []
for p in pairs:
    row = {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * len(p["prompt_ids"])}
    for side in ("chosen", "rejected"):
        ids = p["prompt_ids"] + p[f"{side}_ids"]
        row[f"{side}_input_ids"] = ids
        row[f"{side}_attention_mask"] = [1] * len(ids)
        row[f"{side}_labels"] = [-100] * len(p["prompt_ids"]) + p[f"{side}_ids"]
    features.append(row)
batch = trainer.data_collator(features)
trainer.model.train()
loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
loss.backward()
results["orpo"] = {"loss": loss.detach(), "grads": grads(model), "metrics": metrics}
torch.save(results, out)
'''


@pytest.fixture(scope="module")
def trl_results(tiny_llama_fp32, tmp_path_factory):  # noqa: ANN001, ANN201
    """Our model with perturbed adapters (saved as a PEFT adapter), and TRL's losses and gradients for them."""
    work = tmp_path_factory.mktemp("trl_pref")
    model = lora_model(tiny_llama_fp32)
    save_peft_adapter(model, work / "adapter", tiny_llama_fp32)
    pairs = toy_pairs()
    (work / "spec.json").write_text(json.dumps({"pairs": pairs, "beta": BETA, "dpo_loss_types": DPO_LOSS_TYPES,
                                                       "label_smoothing": LABEL_SMOOTHING}))
    (work / "trl_ref.py").write_text(TRL_SCRIPT)
    env = envs.resolve("trl")
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join(env.pythonpath), **env.env_vars)
    done = subprocess.run([env.python, str(work / "trl_ref.py"), str(tiny_llama_fp32), str(work / "adapter"),
                           str(work / "spec.json"), str(work / "out.pt")], env=run_env, cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return pairs, torch.load(work / "out.pt")


def _ours(ckpt, pairs, objective: ObjectiveOptions):  # noqa: ANN001, ANN202
    model = lora_model(ckpt)
    loss, stats = micro_batch_loss(model, collate_pairs(pairs, 0, objective.kind, objective.pair_layout), objective)
    loss.backward()
    return loss, stats, grads_by_peft_name(model)


def _assert_same(ours, theirs) -> None:  # noqa: ANN001
    loss, _, grads = ours
    torch.testing.assert_close(loss, theirs["loss"], atol=1e-5, rtol=0)
    assert set(grads) == set(theirs["grads"])
    for name, g in theirs["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt", "padded"])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_equals_trl(tiny_llama_fp32, trl_results, loss_type, layout):  # noqa: ANN001
    pairs, theirs = trl_results
    objective = ObjectiveOptions(kind="dpo", beta=BETA, loss_type=loss_type, pair_layout=layout,
                                 label_smoothing=LABEL_SMOOTHING)
    _assert_same(_ours(tiny_llama_fp32, pairs, objective), theirs[f"dpo-{loss_type}"])


def test_orpo_equals_trl(tiny_llama_fp32, trl_results):  # noqa: ANN001
    pairs, theirs = trl_results
    ours = _ours(tiny_llama_fp32, pairs, ObjectiveOptions(kind="orpo", beta=BETA))
    _assert_same(ours, theirs["orpo"])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll_loss",
                 "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected"):
        assert float(ours[1][name]) == pytest.approx(theirs["orpo"]["metrics"][name], abs=1e-5), name
