"""The llamafactory adapter's data and objectives: Alpaca rows through LLaMA-Factory's sft stage, and DPO, ORPO and
KTO through its own dpo and kto stages.

On the CPU (no LLaMA-Factory needed): the rows and ``dataset_info.json`` written for each form, the token ids the
``empty`` template makes of them (the harness's: ``<bos> + prompt + response + <eos>``, loss on the response), the
generated arguments of each stage, what validation refuses (grpo, a DPO loss other than sigmoid, KTO's
apo_zero_unpaired, a precomputed reference), and the read-back from trainers shaped like LLaMA-Factory's. With the
llamafactory environment (``python -m harness env create llamafactory``; skipped otherwise): LLaMA-Factory's own
dataset loader and template tokenise the written files into exactly those ids and labels. On the GPU (``-m gpu``,
the llamafactory environment): a tiny-model Alpaca SFT run beside hf and each objective trained for real through
the harness worker, status ok, valid, the settings read back from the live trainer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from adapters_for_tools import registry
from adapters_for_tools.llamafactory import config as lf_config
from adapters_for_tools.llamafactory import dataset as lf_data
from adapters_for_tools.llamafactory import objectives as lf_objectives
from adapters_for_tools.objective_meter import ObjectiveMeter
from harness.inputs import preference
from harness.inputs.data import IGNORE_INDEX, read_jsonl, tokenize_example, write_jsonl
from harness.inputs.models import build_tokenizer
from harness.running import envs
from harness.spec.scenario import load_scenario, parse_scenario
from tests.objective_scenario import LORA, PROMPTS_DATA, needs_env, objective_yaml, refusal

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"
ALPACA = f"{{source: jsonl, path: {TASKS / 'tb_train_last.jsonl'}, format: alpaca, seq_len: 96, num_samples: 64}}"
needs_lf = needs_env("llamafactory")


def scenario(objective: str = "{kind: sft}", data: str = ALPACA, frameworks: str = "[llamafactory]",
             train: str = "{micro_batch: 4, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3}",
             model: str = "{preset: quality-tiny, weights: random, dtype: float32}", method: str = LORA) -> str:
    return objective_yaml("t_lf", objective, frameworks, "cuda", method=method, data=data, train=train, model=model)


PAIRS = f"{{source: jsonl, path: {TASKS / 'tb_pref_last.jsonl'}, seq_len: 96, num_samples: 32}}"
KINDS = {"dpo": "{kind: dpo, beta: 0.2}", "orpo": "{kind: orpo, beta: 0.3}",
         "kto": "{kind: kto, desirable_weight: 1.5, undesirable_weight: 0.5}"}


def _sc(objective: str = "{kind: sft}", **kw):
    return parse_scenario(scenario(objective, **kw), str(REPO / "scenarios" / "t.yaml"))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(320)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _empty_template(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """What LLaMA-Factory's ``empty`` template makes of one prompt/response pair (train_on_prompt off): the user turn
    and the assistant turn are their content as is, each encoded without special tokens; the prompt is masked."""
    source, target = _enc(tok, prompt), _enc(tok, response)
    return source + target, [IGNORE_INDEX] * len(source) + target


# -- Alpaca rows: the sft stage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_loss", [False, True])
def test_alpaca_rows_give_the_harness_ids_and_labels(tok, prompt_loss):
    rows = read_jsonl(TASKS / "tb_train.jsonl")[:60]  # every family of the mix, inputs and none
    lf, notes = lf_data.lf_rows(rows, "alpaca", "sft", tok.bos_token, tok.eos_token, prompt_loss)
    assert notes == [] and all(r["input"] == "" for r in lf)
    for raw, row in zip(rows, lf, strict=True):
        ids, labels = _empty_template(tok, row["instruction"], row["output"])
        want = tokenize_example(tok, raw, "alpaca", 1 << 20, prompt_loss=prompt_loss)
        assert ids == want["input_ids"]
        assert labels[1:] == want["labels"][1:]  # the first label predicts nothing in either
    if prompt_loss:  # the prompt in the response (not train_on_prompt, which would count the <bos> as a loss token)
        assert {r["instruction"] for r in lf} == {tok.bos_token}


def test_messages_rows_split_as_for_trl_and_say_what_differs(tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    lf, notes = lf_data.lf_rows(rows, "messages", "sft", tok.bos_token, tok.eos_token)
    assert lf == [{"instruction": tok.bos_token + "<|user|>\nhi\n<|assistant|>\n", "input": "", "output":
                   "yo\n" + tok.eos_token}]
    assert notes == []  # the assistant turn's newline bears loss in the harness's labels too
    trailing = [{"messages": rows[0]["messages"] + [{"role": "user", "content": "ok"}]}]  # text after the turn
    assert "LLaMA-Factory's output" in lf_data.lf_rows(trailing, "messages", "sft", tok.bos_token, tok.eos_token)[1][0]
    assert lf_data.lf_rows(trailing, "messages", "sft", tok.bos_token, tok.eos_token, prompt_loss=True)[1] == []


MULTI = [  # two assistant turns, a system turn, text after the last assistant turn (a user turn), an assistant first
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                  {"role": "assistant", "content": "done"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "more"}]},
    {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": "y"}]},
]


def _empty_template_turns(tok, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """What LLaMA-Factory's ``empty`` template makes of sharegpt turns (mask_history off): each value encoded as it
    is, the human ones masked, every gpt one trained."""
    ids, labels = [], []
    for t in turns:
        enc = _enc(tok, t["value"])
        ids += enc
        labels += enc if t["from"] == "gpt" else [IGNORE_INDEX] * len(enc)
    return ids, labels


def test_conversations_with_several_assistant_turns_go_as_sharegpt_turns(tok):
    """Several assistant turns do not fit the prompt/response columns: the file goes in LLaMA-Factory's sharegpt
    formatting instead, each assistant turn a gpt value; the ids are the harness's and every assistant turn bears
    loss (text after the last one too, which the note says)."""
    assert lf_data.form_of_rows("sft", "messages", MULTI) == "turns"
    assert lf_data.form_of_rows("sft", "messages", MULTI[:0] + [MULTI[1]]) == "sft"  # one turn: prompt/response
    assert lf_data.form_of_rows("sft", "messages", MULTI, prompt_loss=True) == "sft"  # one Alpaca row holds it all
    lf, notes = lf_data.lf_rows(MULTI, "messages", "turns", tok.bos_token, tok.eos_token)
    assert lf[0]["conversations"] == [
        {"from": "human", "value": tok.bos_token + "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"},
        {"from": "gpt", "value": "yo\n"}, {"from": "human", "value": "<|user|>\nand?\n<|assistant|>\n"},
        {"from": "gpt", "value": "done\n" + tok.eos_token}]
    assert lf[2]["conversations"][:2] == [{"from": "human", "value": tok.bos_token + "<|assistant|>\n"},
                                          {"from": "gpt", "value": "hello\n"}]
    assert notes and "text after the last assistant turn bears loss in LLaMA-Factory's last gpt value" in notes[0]
    for raw, row in zip(MULTI, lf, strict=True):
        ids, labels = _empty_template_turns(tok, row["conversations"])
        want = tokenize_example(tok, raw, "messages", 1 << 20)
        assert ids == want["input_ids"]
        # the harness's labels, but for the text after the row's last assistant turn, trained too (the note)
        extra = [i for i, (a, b) in enumerate(zip(labels, want["labels"], strict=True)) if a != b]
        assert all(want["labels"][i] == IGNORE_INDEX and labels[i] == ids[i] for i in extra)
        last_turn = max(i for i, b in enumerate(want["labels"][:-1]) if b != IGNORE_INDEX)
        assert all(i > last_turn for i in extra) and (extra != []) == (raw is MULTI[1])  # it ends with a user turn
    assert lf_data.dataset_info(form="turns") == {lf_data.DATASET_NAME: {
        "file_name": lf_data.FILE_NAME, "formatting": "sharegpt", "columns": {"messages": "conversations"}}}
    assert lf_config.native_config(_sc(), Path("w"), "ckpt", Path("d"), fmt="messages")["stage"] == "sft"
    # LLaMA-Factory's cut, pair by pair (infer_seqlen): the same as the end-cut only where the pair it cuts has a
    # prompt under half of what is left and a response that is not
    enc = lambda s: _enc(tok, s)  # noqa: E731
    long = [{"from": "human", "value": tok.bos_token + "q"}, {"from": "gpt", "value": "a" * 40},
            {"from": "human", "value": "r" * 20}, {"from": "gpt", "value": "b" * 40}]
    pair = len(enc(long[0]["value"])) + 40
    for seq_len, cut_otherwise in ((pair + 60, 0), (pair + 55, 0), (pair + 30, 1), (pair - 5, 0), (10, 0)):
        assert lf_data.overlong([{"conversations": long}], "turns", enc, seq_len) == cut_otherwise, seq_len


def test_sft_stage_config_and_dataset_info(tmp_path):
    sc = load_scenario(REPO / "scenarios" / "quality_gpu.yaml")
    cfg = lf_config.native_config(sc, tmp_path, "/ckpt", tmp_path / "lf_data", fmt="alpaca")
    assert (cfg["stage"], cfg["template"], cfg["train_on_prompt"], cfg["cutoff_len"]) == ("sft", "empty", False, 128)
    assert cfg["finetuning_type"] == "full" and cfg["bf16"] and cfg["disable_shuffling"] is True
    assert cfg["per_device_train_batch_size"] == 48 and cfg["lr_scheduler_type"] == "cosine"
    assert not any(k.startswith(("pref_", "kto_")) for k in cfg)
    assert lf_config.cannot_honour(sc, "alpaca") == [] and lf_config.differences(sc, "alpaca") == []
    assert lf_data.dataset_info(form="sft") == {lf_data.DATASET_NAME: {
        "file_name": "data.jsonl", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    # text rows keep the pt stage, now with what its <bos> label does to the loss said beside the run
    text = _sc(data="{source: synthetic, seq_len: 64}")
    assert lf_config.native_config(text, tmp_path, "/ckpt", tmp_path)["stage"] == "pt"
    assert "train_on_prompt" not in lf_config.native_config(text, tmp_path, "/ckpt", tmp_path)
    assert "n / (n + rows)" in lf_config.differences(text, "text")[0]


def test_rows_longer_than_seq_len_are_counted_where_the_cut_differs(tok):
    enc = lambda s: _enc(tok, s)  # noqa: E731
    short = {"instruction": "p" * 10, "input": "", "output": "r" * 10}
    assert lf_data.overlong([short], "sft", enc, 96) == 0
    assert lf_data.overlong([{**short, "output": "r" * 200}], "sft", enc, 96) == 0  # short prompt: the same cut
    assert lf_data.overlong([{**short, "instruction": "p" * 200}], "sft", enc, 96) == 1  # the prompt is cut too
    assert lf_data.overlong([{**short, "instruction": "p" * 60, "output": "r" * 60}], "sft", enc, 96) == 1
    pair = {"prompt": "p" * 60, "chosen": "c" * 10, "rejected": "r" * 60}  # the longer response decides
    assert lf_data.overlong([pair], "pairs", enc, 96) == 1
    assert lf_data.overlong([{"text": "x" * 500}], "text", enc, 96) == 0


# -- preference objectives: the dpo and kto stages -------------------------------------------------------------------


def test_each_objective_maps_to_its_stage(tmp_path):
    dpo = lf_config.native_config(_sc(KINDS["dpo"], data=PAIRS), tmp_path, "/ckpt", tmp_path, fmt="pairs")
    assert (dpo["stage"], dpo["pref_loss"], dpo["pref_beta"], dpo["pref_ftx"]) == ("dpo", "sigmoid", 0.2, 0.0)
    assert "ref_model" not in dpo  # LoRA: the policy with its adapters disabled
    orpo = lf_config.native_config(_sc(KINDS["orpo"], data=PAIRS), tmp_path, "/ckpt", tmp_path, fmt="pairs")
    assert (orpo["stage"], orpo["pref_loss"], orpo["pref_beta"]) == ("dpo", "orpo", 0.3)
    kto = lf_config.native_config(_sc(KINDS["kto"], data=PAIRS), tmp_path, "/ckpt", tmp_path, fmt="labelled")
    assert (kto["stage"], kto["pref_beta"], kto["kto_chosen_weight"], kto["kto_rejected_weight"]) == \
        ("kto", 0.1, 1.5, 0.5)
    assert kto["preprocessing_batch_size"] == 4  # KL pairs within each micro-batch, as TRL's
    for cfg in (dpo, orpo, kto):
        assert cfg["template"] == "empty" and cfg["cutoff_len"] == 96 and "train_on_prompt" not in cfg
    assert lf_config.differences(_sc(KINDS["orpo"], data=PAIRS), "pairs")[0].startswith("orpo: ")


def test_a_reference_copy_beside_a_peft_policy_is_ref_model(tmp_path):
    qlora = "{kind: qlora, lora_r: 8, lora_alpha: 16}"
    bf16 = "{preset: quality-tiny, weights: random, dtype: bfloat16}"
    cfg = lf_config.native_config(_sc("{kind: dpo, reference: copy}", method=qlora, model=bf16, data=PAIRS),
                                  tmp_path, "/ckpt", tmp_path, fmt="pairs")
    assert cfg["ref_model"] == "/ckpt" and cfg["ref_model_quantization_bit"] == 4 and cfg["quantization_bit"] == 4
    full = lf_config.native_config(_sc("{kind: kto}", method="{kind: full}", data=PAIRS), tmp_path, "/ckpt", tmp_path,
                                   fmt="labelled")
    assert "ref_model" not in full  # full fine-tuning: LLaMA-Factory loads the copy itself


def test_preference_rows_and_their_dataset_info(tok):
    pairs = read_jsonl(TASKS / "tb_pref_last.jsonl")[:8]
    rows, _ = lf_data.lf_rows(pairs, "pairs", "pairs", tok.bos_token, tok.eos_token)
    for raw, row in zip(pairs, rows, strict=True):  # TRL's ids: <bos> + prompt + completion + <eos>, loss on the latter
        for key in ("chosen", "rejected"):
            ids, labels = _empty_template(tok, row["prompt"], row[key])
            assert ids == [tok.bos_token_id, *_enc(tok, raw["prompt"] + raw[key]), tok.eos_token_id]
            assert labels == [IGNORE_INDEX] * (1 + len(_enc(tok, raw["prompt"]))) + _enc(tok, raw[key]) + \
                [tok.eos_token_id]
    assert lf_data.dataset_info(form="pairs")[lf_data.DATASET_NAME] == {
        "file_name": "data.jsonl", "formatting": "alpaca", "ranking": True,
        "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}
    labelled = preference.convert(pairs, preference.PAIRS, "kto")
    rows, _ = lf_data.lf_rows(labelled, "labelled", "labelled", tok.bos_token, tok.eos_token)
    assert [r["label"] for r in rows[:2]] == [True, False] and rows[0]["completion"] == pairs[0]["chosen"] + \
        tok.eos_token
    assert lf_data.dataset_info(form="labelled")[lf_data.DATASET_NAME]["columns"] == {
        "prompt": "prompt", "response": "completion", "kto_tag": "label"}
    assert lf_data.form_of("dpo", "pairs") == lf_data.form_of("orpo", "pairs") == "pairs"
    assert lf_data.form_of("kto", "labelled") == "labelled" and lf_data.form_of("sft", "alpaca") == "sft"


# -- what validation refuses -------------------------------------------------------------------------------------------


def test_declares_dpo_orpo_kto_and_refuses_grpo_with_its_reason():
    assert registry.info("llamafactory").objectives == {"sft", "dpo", "orpo", "kto"}
    msg = refusal(scenario("{kind: grpo, num_generations: 2, max_new_tokens: 4}", data=PROMPTS_DATA))
    assert "llamafactory cannot run this scenario: objective 'grpo' not supported" in msg and "no GRPO stage" in msg


@pytest.mark.parametrize(("objective", "method", "why"), [
    ("{kind: dpo, loss_type: ipo}", LORA, "computes the sigmoid loss whatever its pref_loss says"),
    ("{kind: dpo, loss_type: hinge}", LORA, "it runs sigmoid only"),
    ("{kind: kto, loss_type: apo_zero_unpaired}", LORA, "sets loss_type 'kto'"),
    ("{kind: dpo, reference: precomputed}", LORA, "run the reference at every step"),
    ("{kind: kto, reference: precomputed}", "{kind: full}", "run the reference at every step"),
])
def test_validate_refuses_what_llamafactory_cannot_run(objective, method, why):
    msg = refusal(scenario(objective, method=method, data=PAIRS))
    assert "llamafactory cannot run this scenario: " in msg and why in msg


@pytest.mark.parametrize(("objective", "method"), [
    ("{kind: dpo}", LORA), ("{kind: dpo, reference: copy}", LORA), ("{kind: dpo}", "{kind: full}"),
    ("{kind: orpo}", LORA), ("{kind: kto, undesirable_weight: 2.0}", LORA), ("{kind: kto}", "{kind: full}"),
])
def test_validate_takes_what_llamafactory_runs(objective, method):
    parse_scenario(scenario(objective, method=method, data=PAIRS), "t.yaml")


def test_the_objective_scenarios_list_llamafactory():
    for name in ("llama8b_dpo", "llama8b_orpo", "llama8b_kto"):
        sc = load_scenario(REPO / "scenarios" / f"{name}.yaml")
        assert "llamafactory" in sc.framework_names()


# -- the read-back from the live trainer -----------------------------------------------------------------------------


class _DpoTrainer:
    """Shaped like LLaMA-Factory's CustomDPOTrainer: ``compute_preference_loss`` runs ``loss`` on the margins (its
    call into TRL 0.24's ``dpo_loss`` takes the sigmoid whatever ``loss_type`` says)."""

    def __init__(self, loss_type: str = "sigmoid", loss: str = "sigmoid", beta: float = 0.1,
                 use_ref_model: bool = True, ref_model=None):  # noqa: ANN001
        self.loss_type, self.loss, self.beta, self.ref_model = loss_type, loss, beta, ref_model
        self.finetuning_args = SimpleNamespace(use_ref_model=use_ref_model)

    def compute_preference_loss(self, c, r, rc, rr):  # noqa: ANN001, ANN201
        import torch.nn.functional as F

        z = (c - rc) - (r - rr)
        losses = {"sigmoid": -F.logsigmoid(self.beta * z), "hinge": (1 - self.beta * z).clamp(min=0),
                  "ipo": (z - 1 / (2 * self.beta)) ** 2, "orpo": -c}[self.loss]
        return losses, None, None


def test_dpo_read_back_probes_the_loss_that_runs():
    pytest.importorskip("torch")
    assert lf_objectives.read_back(_DpoTrainer()) == {"objective": "dpo", "beta": 0.1, "reference":
                                                      "adapter_disabled", "loss_type": "sigmoid"}
    assert lf_objectives.read_back(_DpoTrainer(ref_model=object()))["reference"] == "copy"
    # pref_loss ipo under LLaMA-Factory 0.9.5: the sigmoid loss runs (of per-token mean log-probs): not "ipo"
    assert lf_objectives.read_back(_DpoTrainer(loss_type="ipo"))["loss_type"] == "sigmoid (pref_loss 'ipo')"
    for loss in ("hinge", "ipo"):  # a trainer that does compute them is read as such, for every beta
        for beta in (0.05, 0.1, 0.5, 2.0):
            assert lf_objectives.probe_dpo_loss(_DpoTrainer(loss_type=loss, loss=loss, beta=beta)) == loss
    assert lf_objectives.probe_dpo_loss(_DpoTrainer(loss="orpo")).startswith("unrecognised")
    orpo = _DpoTrainer(loss_type="orpo", loss="orpo", beta=0.3, use_ref_model=False)
    assert lf_objectives.read_back(orpo) == {"objective": "orpo", "beta": 0.3, "reference": "none"}


def test_kto_read_back():
    kto = SimpleNamespace(beta=0.1, loss_type="kto", desirable_weight=1.5, undesirable_weight=1.0, ref_model=None,
                          finetuning_args=SimpleNamespace(use_ref_model=False))  # use_ref_model: the dpo stage's
    assert lf_objectives.read_back(kto) == {"objective": "kto", "beta": 0.1, "reference": "adapter_disabled",
                                            "loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 1.0}


def test_built_records_the_trainer_and_restores_the_class():
    class Trainer:
        def __init__(self, x: int):
            self.x = x

    original = Trainer.__init__
    with lf_objectives.built(Trainer) as made:
        t = Trainer(3)
    assert made == [t] and Trainer.__init__ is original
    Trainer(4)
    assert made == [t]


def test_popped_labels_count_the_loss_tokens():
    """LLaMA-Factory pops the labels before the policy's forward: handed over, they count its loss-bearing tokens;
    the reference's forward (no gradient) is counted apart and takes none."""
    torch = pytest.importorskip("torch")
    from harness.measuring.meter import StepMeter

    class Policy(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
            return input_ids.float().sum()

    class Trainer:  # the shape of CustomDPOTrainer's concatenated_forward: labels popped, then the model
        model = Policy()
        ref_model = None

        def concatenated_forward(self, model, batch, is_ref_model=False):  # noqa: ANN001, ANN201
            batch = dict(batch)
            batch.pop("labels")
            return model(**batch)

    meter = StepMeter(0)
    om = ObjectiveMeter(meter, "cpu")
    trainer = Trainer()
    om.attach(trainer, "dpo")
    lf_objectives.hand_over_labels(trainer, om)
    ids = torch.ones(4, 6, dtype=torch.long)
    labels = torch.full((4, 6), IGNORE_INDEX)
    labels[:, 4:] = 1  # two loss-bearing tokens a row
    meter.step_begin()
    om.in_step = True
    trainer.concatenated_forward(trainer.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                 "labels": labels})
    with torch.no_grad():
        trainer.concatenated_forward(trainer.model, {"input_ids": ids, "labels": labels}, is_ref_model=True)
    om.in_step = False
    meter.step_end(1.0)
    assert (meter.steps[0]["tokens"], meter.steps[0]["loss_tokens"]) == (24, 8)
    assert om.nograd_forwards == 1 and om.nograd_step == 24 and om.pending_labels is None


# -- LLaMA-Factory's own loader on the written files (the llamafactory environment) ----------------------------------
LF_LOADER = """
import json, sys
import yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
out = {}
for work in sys.argv[1:]:
    args = yaml.safe_load(open(work + "/llamafactory.yaml"))
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tm = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
    stage = {"dpo": "rm"}.get(args["stage"], args["stage"])
    ds = get_dataset(template, model_args, data_args, training_args, stage=stage, **tm)["train_dataset"]
    keep = ("input_ids", "labels", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "kl_input_ids",
            "kto_tags")
    out[work] = [{k: r[k] for k in keep if k in r} for r in ds]
print("LF_ROWS " + json.dumps(out))
"""


def _write_run(tmp_path: Path, name: str, sc, rows: list[dict], fmt: str, tok, ckpt: Path) -> Path:
    work = tmp_path / name
    (work / "lf_data").mkdir(parents=True)
    form = lf_data.form_of_rows(sc.objective.kind, fmt, rows, sc.data.prompt_loss)
    lf, _ = lf_data.lf_rows(rows, fmt, form, tok.bos_token, tok.eos_token, sc.data.prompt_loss)
    write_jsonl(lf, work / "lf_data" / lf_data.FILE_NAME)
    (work / "lf_data" / "dataset_info.json").write_text(json.dumps(lf_data.dataset_info(form=form)))
    args = lf_config.native_config(sc, work, str(ckpt), work / "lf_data", fmt=fmt) | {"use_cpu": True}
    (work / "llamafactory.yaml").write_text(yaml.safe_dump(args))
    return work


@needs_lf
def test_llamafactory_loader_tokenises_the_files_into_the_harness_ids(tmp_path, tok):
    ckpt = tmp_path / "tok"
    tok.save_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 320}))
    alpaca = read_jsonl(TASKS / "tb_train.jsonl")[:40]
    pairs = read_jsonl(TASKS / "tb_pref_last.jsonl")[:16]
    labelled = preference.convert(pairs, preference.PAIRS, "kto")
    pl = ALPACA.replace("format: alpaca", "format: alpaca, prompt_loss: true")
    works = {
        "sft": _write_run(tmp_path, "sft", _sc(), alpaca, "alpaca", tok, ckpt),
        "sft_pl": _write_run(tmp_path, "sft_pl", _sc(data=pl), alpaca, "alpaca", tok, ckpt),
        "dpo": _write_run(tmp_path, "dpo", _sc(KINDS["dpo"], data=PAIRS), pairs, "pairs", tok, ckpt),
        "kto": _write_run(tmp_path, "kto", _sc(KINDS["kto"], data=PAIRS), labelled, "labelled", tok, ckpt),
        "turns": _write_run(tmp_path, "turns", _sc(), MULTI, "messages", tok, ckpt),
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*envs.resolve("llamafactory").pythonpath, str(REPO)]),
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LF_LOADER, *map(str, works.values())], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("LF_ROWS "))[len("LF_ROWS "):])
    got = {name: got[str(w)] for name, w in works.items()}
    for name, prompt_loss in (("sft", False), ("sft_pl", True)):
        assert len(got[name]) == len(alpaca)
        for raw, r in zip(alpaca, got[name], strict=True):
            want = tokenize_example(tok, raw, "alpaca", 96, prompt_loss=prompt_loss)
            assert r["input_ids"] == want["input_ids"] and r["labels"][1:] == want["labels"][1:]
            assert r["labels"][0] == IGNORE_INDEX  # no loss token the Trainer would count that nothing predicts
    assert len(got["turns"]) == len(MULTI)  # sharegpt conversations: none dropped as invalid
    for raw, r in zip(MULTI, got["turns"], strict=True):
        want = tokenize_example(tok, raw, "messages", 96)
        assert r["input_ids"] == want["input_ids"]
        # every assistant turn trained; beyond the harness's labels only the text after the last one (the note)
        last_turn = max(i for i, b in enumerate(want["labels"][:-1]) if b != IGNORE_INDEX)
        assert r["labels"][: last_turn + 1] == want["labels"][: last_turn + 1]
        assert r["labels"][last_turn + 1:] == r["input_ids"][last_turn + 1:]
    for raw, r in zip(pairs, got["dpo"], strict=True):
        assert r["chosen_input_ids"] == [tok.bos_token_id, *_enc(tok, raw["prompt"] + raw["chosen"]), tok.eos_token_id]
        assert r["rejected_input_ids"] == [tok.bos_token_id, *_enc(tok, raw["prompt"] + raw["rejected"]),
                                           tok.eos_token_id]
    mb = 4  # micro_batch: the KL estimate pairs each prompt with the previous completion of its micro-batch
    for i, (raw, r) in enumerate(zip(labelled, got["kto"], strict=True)):
        kl = labelled[i - 1 if i % mb else i + mb - 1]
        assert r["input_ids"] == [tok.bos_token_id, *_enc(tok, raw["prompt"] + raw["completion"]), tok.eos_token_id]
        assert r["kl_input_ids"] == [tok.bos_token_id, *_enc(tok, raw["prompt"] + kl["completion"]), tok.eos_token_id]
        assert r["kto_tags"] == raw["label"]


# -- on a GPU (the lead's: `python -m pytest -q -m gpu tests/adapters/test_llamafactory_data.py`) ---------------------


def _gpu_sweep(tmp_path, monkeypatch, text: str, frameworks: list[str]) -> dict[str, dict]:
    from harness.running import runner

    if why := envs.unavailable(registry.info("llamafactory"), "cuda"):
        pytest.skip(why)
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEBENCH_WORK", str(tmp_path / "work"))
    (tmp_path / "t.yaml").write_text(text)
    sweep = runner.run_sweep(parse_scenario(text, str(tmp_path / "t.yaml")), tmp_path / "results", new=True,
                             quiet=True)
    out = {fw: runner.load_result(sweep, fw, 0) for fw in frameworks}
    for fw, res in out.items():
        assert res["status"] == "ok", (fw, res.get("reason"), (res.get("traceback") or "")[-3000:])
        assert res["valid"], (fw, res["invalid_reasons"])
    return out


@pytest.mark.gpu
def test_multi_turn_conversations_on_the_gpu_train_the_tokens_hf_trains(tmp_path, monkeypatch):
    """Conversations with several assistant turns (LLaMA-Factory's sharegpt turns, Unsloth's and TRL's pre-tokenised
    rows): every tool trains hf's tokens and loss tokens at every step, and its loss agrees with hf's."""
    if why := envs.unavailable(registry.info("unsloth"), "cuda"):
        pytest.skip(why)
    write_jsonl([MULTI[0], MULTI[2]] * 16, tmp_path / "multi.jsonl")  # each ends with an assistant turn
    data = f"{{source: jsonl, path: {tmp_path / 'multi.jsonl'}, format: messages, seq_len: 96}}"
    text = scenario(data=data, method="{kind: full}", frameworks="[hf, llamafactory, unsloth, trl]")
    res = _gpu_sweep(tmp_path, monkeypatch, text.replace("measure: {", "measure: {baseline: hf, "),
                     ["hf", "llamafactory", "unsloth", "trl"])
    want = [(s["tokens"], s["loss_tokens"]) for s in res["hf"]["steps"]]
    for fw in ("llamafactory", "unsloth", "trl"):
        got = res[fw]["steps"]
        assert [(s["tokens"], s["loss_tokens"]) for s in got] == want, fw
        for a, b in zip(got, res["hf"]["steps"], strict=True):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3), (fw, a["loss"], b["loss"])


@pytest.mark.gpu
def test_alpaca_sft_on_the_gpu_trains_the_tokens_hf_trains(tmp_path, monkeypatch):
    """quality-tiny on Alpaca rows, float32: LLaMA-Factory's sft stage and hf see the same tokens and loss tokens
    at every step, and their loss curves agree (measured equal to 1e-6 on a CPU)."""
    res = _gpu_sweep(tmp_path, monkeypatch, scenario(method="{kind: full}", frameworks="[hf, llamafactory]")
                     .replace("measure: {", "measure: {baseline: hf, "), ["hf", "llamafactory"])
    hf, lf = res["hf"], res["llamafactory"]
    assert [(s["tokens"], s["loss_tokens"]) for s in lf["steps"]] == [(s["tokens"], s["loss_tokens"])
                                                                       for s in hf["steps"]]
    for a, b in zip(lf["steps"], hf["steps"], strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3), (a["loss"], b["loss"])
    cfg = yaml.safe_load(Path(lf["native_config"]).read_text())
    assert (cfg["stage"], cfg["template"]) == ("sft", "empty")
    assert (Path(lf["native_config"]).parent / "lf_data" / "dataset_info.json").exists()


GPU_OBJECTIVES = {
    "dpo": ("{kind: dpo, beta: 0.1}", LORA, {"loss_type": "sigmoid", "reference": "adapter_disabled"}),
    "dpo-qlora-copy": ("{kind: dpo, beta: 0.1, reference: copy}", "{kind: qlora, lora_r: 8, lora_alpha: 16}",
                       {"loss_type": "sigmoid", "reference": "copy"}),
    "orpo": ("{kind: orpo, beta: 0.1}", LORA, {"reference": "none"}),
    "kto": ("{kind: kto, beta: 0.1}", LORA, {"loss_type": "kto", "reference": "adapter_disabled",
                                             "desirable_weight": 1.0, "undesirable_weight": 1.0}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_OBJECTIVES))
def test_each_objective_on_the_gpu_through_the_worker(case, tmp_path, monkeypatch):
    """tiny-llama, synthetic pairs of exactly seq_len tokens: every step trains ``2 x micro_batch x grad_accum x
    seq_len`` tokens for DPO and ORPO (chosen and rejected), ``micro_batch x grad_accum x seq_len`` for KTO; TRL's
    row beside it when the trl environment exists (the same tokens; DPO and KTO: the same loss curve)."""
    objective, method, settings = GPU_OBJECTIVES[case]
    kind = case.split("-")[0]
    with_trl = not envs.unavailable(registry.info("trl"), "cuda")
    frameworks = ["llamafactory", "trl"] if with_trl else ["llamafactory"]
    mb = 4 if kind == "kto" else 2
    text = scenario(objective, method=method, data="{source: synthetic, seq_len: 48, lengths: fixed}",
                    train=f"{{micro_batch: {mb}, grad_accum: 2, steps: 3, warmup_steps: 1, lr: 1.0e-3}}",
                    model="{preset: tiny-llama, weights: random, dtype: bfloat16}",
                    frameworks=f"[{', '.join(frameworks)}]").replace("measure: {", f"measure: {{baseline: "
                                                                                        f"{frameworks[-1]}, ")
    res = _gpu_sweep(tmp_path, monkeypatch, text, frameworks)
    lf = res["llamafactory"]
    eff = lf["effective"]
    assert (eff["objective"], eff["beta"], eff["micro_batch"]) == (kind, 0.1, mb)
    assert {k: eff[k] for k in settings} == settings
    rows = 2 * mb if kind != "kto" else mb
    assert [s["tokens"] for s in lf["steps"]] == [rows * 2 * 48] * 3
    assert len(lf["extra"]["train_rewards"]) == 3
    if kind != "orpo":
        assert lf["extra"]["reference_pass"]["tokens_per_step_mean"] > 0
    cfg = yaml.safe_load(Path(lf["native_config"]).read_text())
    assert cfg["stage"] == ("kto" if kind == "kto" else "dpo") and "llamafactory.cli train" in lf["extra"]["rerun"]
    if with_trl:
        trl = res["trl"]
        assert [s["tokens"] for s in lf["steps"]] == [s["tokens"] for s in trl["steps"]]
        if kind != "orpo":  # ORPO's NLL term is LLaMA-Factory's own (extra["differences"])
            assert [s["loss_tokens"] for s in lf["steps"]] == [s["loss_tokens"] for s in trl["steps"]]
            for a, b in zip(lf["steps"], trl["steps"], strict=True):
                assert math.isclose(a["loss"], b["loss"], rel_tol=2e-2), (a["loss"], b["loss"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
