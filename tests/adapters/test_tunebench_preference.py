"""The tunebench adapter's DPO, ORPO and KTO: TRL's tokenisation of the rows, and runs through the harness worker
(in process, CPU, tiny model)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from adapters_for_tools.tunebench.pairs import dpo_pairs, kto_rows, orpo_pairs
from harness.inputs.models import build_tokenizer
from harness.inputs.preference import convert
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


def test_kto_rows_keep_order_labels_and_whole_completions(tok):  # noqa: ANN001
    """KTO's rows as DPO tokenises a completion (BOS + prompt, completion + EOS), in order, labels kept; a row whose
    prompt fills max_length is dropped, the others stay whole (the trainer cuts each sequence, KL ones too)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [{"prompt": "ab", "completion": "cdefgh", "label": True},
            {"prompt": "a long prompt", "completion": "x", "label": False},
            {"prompt": "hi", "completion": "yo", "label": False}]
    assert kto_rows(rows, tok, 5) == [
        {"prompt_ids": [bos, *_bytes("ab")], "completion_ids": [*_bytes("cdefgh"), eos], "label": True},
        {"prompt_ids": [bos, *_bytes("hi")], "completion_ids": [*_bytes("yo"), eos], "label": False}]
    assert len(kto_rows(rows, tok, None)) == 3


SCENARIO = """
version: 1
name: tb_pref_test
model: {{preset: tiny-llama, weights: random, dtype: float32, seed: 0}}
method: {{kind: lora, lora_r: 4, lora_alpha: 8, target_modules: all-linear}}
objective: {{kind: {kind}, beta: 0.2{objective}}}
data: {{source: synthetic, seq_len: 48, lengths: uniform, min_len: 12}}
train: {{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}}
hardware: {{device: cpu}}
frameworks: [{{name: tunebench, overrides: {{fused_ce_chunk: 16{layout}}}}}]
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
    sc = parse_scenario(SCENARIO.format(kind=kind, layout=f", pair_layout: {layout}", objective=""))
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

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ckpt, rows_path, max_length, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
given = json.loads(open(rows_path).read())
rows = given["pairs"]
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
kto = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt),
                 args=KTOConfig(output_dir=work, report_to=[], use_cpu=True, max_length=max_length,
                                per_device_train_batch_size=2),
                 train_dataset=Dataset.from_list(given["labelled"]), processing_class=tok)
result["kto"] = [{k: ex[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")}
                 for ex in kto.train_dataset]
open(out, "w").write(json.dumps(result))
'''


@pytest.mark.slow
@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
def test_pairs_equal_trls_own_tokenisation(tmp_path, monkeypatch, tok):  # noqa: ANN001
    """dpo_pairs / orpo_pairs / kto_rows give the token ids and prompt/completion split TRL 1.16's trainers build
    from the same rows and max_length (run in the trl environment)."""
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = prepare_random_checkpoint(get_preset("tiny-llama"), "float32", 0)
    rows = [*ROWS, {"prompt": "Q: 2+2?\n### Response:\n", "chosen": "4", "rejected": "five"}]
    labelled = convert(rows, "pairs", "kto")
    (tmp_path / "rows.json").write_text(json.dumps({"pairs": rows, "labelled": labelled}))
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
    kto = kto_rows(labelled, tok, 12)
    assert [{k: r[k] for k in ("prompt_ids", "completion_ids", "label")} for r in theirs["kto"]] == kto
    # the KL completions TRL adds (batches of 2: each row's partner's) are the ones the trainer builds per micro-batch
    assert [r["KL_completion_ids"] for r in theirs["kto"]] == [
        kto[j]["completion_ids"] for i in range(0, len(kto), 2) for j in ((i + 1, i) if i + 1 < len(kto) else (i,))]


@pytest.mark.usefixtures("cpu_references")
@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_worker_trains_kto(tmp_path, monkeypatch, reference):  # noqa: ANN001
    """KTO through the worker: TRL's settings read back, tokens/s over the labelled rows alone (the KL estimate and
    the reference counted apart: each micro-batch's rows once, its KL rows twice; with the reference precomputed,
    the KL rows once in every step, and rows and KL rows once before the first), rewards kept per step."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    sc = parse_scenario(SCENARIO.format(kind="kto", layout="",
                                        objective=f", desirable_weight: 1.5, reference: {reference}"))
    res = run_first_row(sc, tmp_path)
    assert res["status"] == "ok", res.get("reason")
    eff = res["effective"]
    assert {k: eff[k] for k in ("objective", "beta", "reference", "loss_type", "desirable_weight",
                                "undesirable_weight", "micro_batch")} == {
        "objective": "kto", "beta": 0.2, "reference": "adapter_disabled" if reference == "auto" else reference,
        "loss_type": "kto",
        "desirable_weight": 1.5, "undesirable_weight": 1.0, "micro_batch": 2}
    rows = kto_rows([json.loads(line) for line in open(tmp_path / "data" / "dataset.jsonl")], build_tokenizer(320),
                    48)
    assert [r["label"] for r in rows[:4]] == [True, False, True, False]  # good and bad in every micro-batch
    # micro_batch 2 x grad_accum 2, in file order; synthetic rows fit seq_len whole. The KL rows of a micro-batch
    # of two: each prompt with the other row's completion
    trained, kl = [], []
    for step in range(3):
        mbs = [rows[4 * step:4 * step + 2], rows[4 * step + 2:4 * step + 4]]
        trained.append(sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for mb in mbs for r in mb))
        kl.append(sum(len(a["prompt_ids"]) + len(b["completion_ids"]) for mb in mbs for a, b in zip(mb, mb[::-1],
                                                                                                    strict=True)))
    assert [s["tokens"] for s in res["steps"]] == trained
    ref = res["extra"]["reference_pass"]
    if reference == "auto":  # 3 steps x 2 micro-batches x (KL policy, KL reference, reference)
        assert (ref["forwards"], ref["tokens_before_training"]) == (18, 0)
        assert ref["tokens_per_step_mean"] == pytest.approx((sum(trained) + 2 * sum(kl)) / 3)
    else:  # 6 micro-batches once before training, then the KL policy forward of each in its step
        assert (ref["forwards"], ref["tokens_before_training"]) == (12, sum(trained) + sum(kl))
        assert ref["tokens_per_step_mean"] == pytest.approx(sum(kl) / 3) and ref["precompute_s"] > 0
    rewards = res["extra"]["train_rewards"]
    assert [r["step"] for r in rewards] == [1, 2, 3] and "accuracy" not in rewards[0]
    assert rewards[0]["margin"] == 0  # the policy starts as the reference
    assert res["steps"][0]["loss"] == pytest.approx(0.5 * (1.5 + 1.0) / 2, abs=1e-6)


def test_kto_row_refusals():
    """What the trainer cannot run is refused at validation: a reference other than its adapters switched off, and
    a pair layout (KTO has no pairs)."""
    from harness.spec.scenario import ScenarioError

    assert parse_scenario(SCENARIO.format(kind="kto", layout="", objective="")).objective.kind == "kto"
    with pytest.raises(ScenarioError, match="tunebench cannot run this scenario: kto reference 'copy'"):
        parse_scenario(SCENARIO.format(kind="kto", layout="", objective=", reference: copy"))
    with pytest.raises(ScenarioError, match=r"pair_layout: needs a dpo or orpo objective \(it arranges pairs; kto"):
        parse_scenario(SCENARIO.format(kind="kto", layout=", pair_layout: padded", objective=""))


BESIDE_TRL = """
version: 1
name: tb_beside_trl
model: {{preset: tiny-llama, weights: random, dtype: float32, seed: 0}}
method: {{kind: lora, lora_r: 4, lora_alpha: 8, target_modules: all-linear}}
objective: {{kind: {kind}, beta: 0.3, reference: {reference}}}
data: {{source: synthetic, seq_len: 24, lengths: uniform, min_len: 10}}
train: {{micro_batch: 3, grad_accum: 2, steps: 4, warmup_steps: 1, lr: 1.0e-3, gradient_checkpointing: true}}
hardware: {{device: cpu}}
frameworks: [trl, tunebench]
measure: {{repeats: 1, baseline: trl}}
"""


@pytest.mark.slow
@pytest.mark.skipif(not envs.resolve("trl").ready,
                    reason="trl environment not created: run `python -m harness env create trl`")
@pytest.mark.usefixtures("cpu_references")
@pytest.mark.parametrize(("kind", "reference"), [("kto", "auto"), ("kto", "precomputed"), ("dpo", "precomputed")])
def test_beside_trl_the_same_steps_and_counts(tmp_path, monkeypatch, kind, reference):  # noqa: ANN001
    """One sweep of trl and tunebench (micro-batches of 3, so some KTO micro-batches hold one label only): the
    same per-step losses and trained tokens, and the same tokens without gradient per step and before the first."""
    from harness.running import runner

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    sweep = runner.run_sweep(parse_scenario(BESIDE_TRL.format(kind=kind, reference=reference)),
                             tmp_path / "results", new=True, quiet=True)
    res = {fw: runner.load_result(sweep, fw, 0) for fw in ("trl", "tunebench")}
    for fw, r in res.items():
        assert r["status"] == "ok" and r["valid"], (fw, r.get("reason"), r["invalid_reasons"])
    trl, ours = res["trl"], res["tunebench"]
    assert [s["tokens"] for s in ours["steps"]] == [s["tokens"] for s in trl["steps"]]
    assert [s["loss"] for s in ours["steps"]] == pytest.approx([s["loss"] for s in trl["steps"]], abs=1e-5)
    for key in ("tokens_per_step_mean", "tokens_before_training"):
        assert ours["extra"]["reference_pass"][key] == pytest.approx(trl["extra"]["reference_pass"][key]), key


@pytest.mark.usefixtures("cpu_references")
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_worker_plans_a_preference_run_to_its_budget(tmp_path, monkeypatch, kind):  # noqa: ANN001
    """`plan` on a preference row: the plan and its probe are recorded, and the steps are the unplanned row's."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    runs = {}
    for plan in ("", ", plan: 2"):
        sc = parse_scenario(SCENARIO.format(kind=kind, layout=plan, objective=""))
        runs[plan] = run_first_row(sc, tmp_path / (plan and "planned"))
        assert runs[plan]["status"] == "ok", runs[plan].get("reason")
    planned, plain = runs[", plan: 2"], runs[""]
    rec = planned["extra"]["trainer"]["plan"]
    assert rec["budget"]["setting"] == 2.0 and rec["fits"] and rec["probe"]["after_step"] == 2
    assert "plan" not in plain["extra"]["trainer"]
    assert [s["tokens"] for s in planned["steps"]] == [s["tokens"] for s in plain["steps"]]
    assert [s["loss"] for s in planned["steps"]] == pytest.approx([s["loss"] for s in plain["steps"]], abs=1e-6)
