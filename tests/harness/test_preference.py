"""Objectives in the scenario (harness/spec/objective.py) and their data (harness/inputs/preference.py, the task
generator's pairs): defaults, refusals with file:line: key: reason, row forms, conversions, generated files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.inputs import preference as pref
from harness.inputs.tasks import files as task_files
from harness.inputs.tasks.generator import FAMILIES, generate
from harness.spec.scenario import ScenarioError, load_scenario, parse_scenario, scenario_from_dict

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "scenarios" / "tasks"
PAIRS_FILE = str(TASKS / "tb_pref_last.jsonl")


def scenario(objective: str = "", method: str = "{kind: lora, lora_r: 4}", data: str | None = None,
             train: str = "{micro_batch: 2, steps: 4, warmup_steps: 1}", frameworks: str = "[trl]") -> str:
    data = data or f"{{source: jsonl, path: {PAIRS_FILE}, seq_len: 96}}"
    return (f"version: 1\nname: t\nmodel: {{preset: tiny-llama, dtype: float32}}\nmethod: {method}\n"
            + (f"objective: {objective}\n" if objective else "")
            + f"data: {data}\ntrain: {train}\nhardware: {{device: cpu}}\nframeworks: {frameworks}\n"
            "measure: {baseline: " + frameworks.strip("[]").split(",")[0] + "}\n")


def _err(text: str) -> str:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(text, "s.yaml")
    return str(ei.value)


# -- the schema ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "quality_small.yaml", "llama8b_lora.yaml"])
def test_sft_is_the_default_and_leaves_the_hash_alone(name):
    text = (REPO / "scenarios" / name).read_text()
    sc = parse_scenario(text, str(REPO / "scenarios" / name))
    explicit = parse_scenario(text + "objective: {kind: sft}\n", str(REPO / "scenarios" / name))
    assert sc.objective.kind == "sft" and sc.objective.is_sft
    assert "objective" not in sc.to_dict() and "objective" not in explicit.to_dict()
    assert sc.content_hash() == explicit.content_hash()
    assert sc.settings_hash(sc.framework_names()[0]) == explicit.settings_hash(sc.framework_names()[0])


def test_dpo_defaults_are_filled_and_survive_a_round_trip():
    sc = parse_scenario(scenario("{kind: dpo}"), "s.yaml")
    ob = sc.objective
    assert (ob.kind, ob.beta, ob.loss_type, ob.reference) == ("dpo", 0.1, "sigmoid", "auto")
    assert ob.reference_for(is_peft=True) == "adapter_disabled" and ob.reference_for(is_peft=False) == "copy"
    assert sc.to_dict()["objective"]["beta"] == 0.1
    again = scenario_from_dict(sc.to_dict())
    assert again.content_hash() == sc.content_hash()
    assert parse_scenario(scenario("{kind: dpo, beta: 0.2}"), "s.yaml").content_hash() != sc.content_hash()


def test_each_kind_gets_its_own_defaults():
    kto = parse_scenario(scenario("{kind: kto}"), "s.yaml").objective
    assert (kto.loss_type, kto.desirable_weight, kto.undesirable_weight, kto.reference) == ("kto", 1.0, 1.0, "auto")
    orpo = parse_scenario(scenario("{kind: orpo}"), "s.yaml").objective
    assert (orpo.beta, orpo.reference, orpo.loss_type) == (0.1, "none", None)
    grpo = parse_scenario(scenario("{kind: grpo}", data=f"{{source: jsonl, path: {TASKS / 'tb_prompts_add.jsonl'}, "
                                   "seq_len: 96}", train="{micro_batch: 4, steps: 4, warmup_steps: 1}"),
                          "s.yaml").objective
    assert (grpo.beta, grpo.reference, grpo.num_generations, grpo.max_new_tokens, grpo.reward) == \
        (0.0, "none", 4, 16, "exact_match")
    assert parse_scenario(scenario("{kind: grpo, beta: 0.04}", data=f"{{source: jsonl, path: "
                                   f"{TASKS / 'tb_prompts_add.jsonl'}, seq_len: 96}}",
                                   train="{micro_batch: 4, steps: 4, warmup_steps: 1}"),
                          "s.yaml").objective.reference == "auto"


def test_expected_settings_resolve_the_reference():
    sc = parse_scenario(scenario("{kind: kto}", train="{micro_batch: 2, steps: 4, warmup_steps: 1}"), "s.yaml")
    assert sc.objective.expected(sc.method.is_peft) == {
        "objective": "kto", "beta": 0.1, "loss_type": "kto", "reference": "adapter_disabled",
        "desirable_weight": 1.0, "undesirable_weight": 1.0}
    sft = parse_scenario(scenario(data="{source: synthetic, seq_len: 64}", frameworks="[hf]"), "s.yaml")
    assert sft.objective.expected(True) == {}


@pytest.mark.parametrize(("objective", "needle"), [
    ("{kind: sft, beta: 0.1}", "objective: beta not used by objective 'sft' (it takes: no other settings)"),
    ("{kind: dpo, num_generations: 4}", "num_generations not used by objective 'dpo'"),
    ("{kind: dpo, loss_type: kto}", "loss_type 'kto' is not a dpo loss (one of: sigmoid, ipo, hinge"),
    ("{kind: orpo, loss_type: sigmoid}", "loss_type not used by objective 'orpo'"),
    ("{kind: dpo, beta: 0}", "dpo needs beta > 0"),
    ("{kind: orpo, reference: copy}", "orpo is reference-free: reference must be 'none'"),
    ("{kind: kto, reference: none}", "kto compares with a reference"),
    ("{kind: dpo, refrence: copy}", "objective.refrence: unknown key; did you mean 'reference'?"),
    ("{kind: ppo}", "objective.kind: Input should be 'sft', 'dpo', 'orpo', 'kto' or 'grpo'"),
    ("{kind: dpo, beta: .inf}", "objective.beta"),
])
def test_bad_objectives_are_refused_at_their_line(objective, needle):
    msg = _err(scenario(objective))
    assert needle in msg, msg
    assert msg.startswith("s.yaml:5: objective"), msg  # the objective's own line


def test_grpo_rules():
    prompts = f"{{source: jsonl, path: {TASKS / 'tb_prompts_add.jsonl'}, seq_len: 96}}"
    msg = _err(scenario("{kind: grpo, num_generations: 3}", data=prompts))
    assert "s.yaml:5: objective.num_generations: a step's 2 completions (micro_batch x grad_accum) must be whole " \
           "groups of num_generations (3)" in msg
    assert "max_new_tokens: 96 leaves no room for a prompt" in _err(scenario(
        "{kind: grpo, num_generations: 2, max_new_tokens: 96}", data=prompts))
    assert "grpo rewards answers: give a jsonl" in _err(scenario(
        "{kind: grpo, num_generations: 2}", data="{source: synthetic, seq_len: 64}"))
    assert "cannot be computed beforehand" in _err(scenario(
        "{kind: grpo, num_generations: 2, beta: 0.1, reference: precomputed}", data=prompts))
    assert "reference 'none' goes with beta 0" in _err(scenario(
        "{kind: grpo, num_generations: 2, beta: 0.1, reference: none}", data=prompts))


def test_cross_section_rules():
    assert "s.yaml:5: objective.reference: adapter_disabled needs adapters to disable (method lora, qlora or dora, " \
           "not full)" in _err(scenario("{kind: dpo, reference: adapter_disabled}", method="{kind: full}"))
    msg = _err(scenario("{kind: dpo}", data=f"{{source: jsonl, path: {PAIRS_FILE}, seq_len: 96, format: alpaca, "
                                             "packing: true, prompt_loss: true}"))
    for key in ("data.packing: packing applies to sft", "data.prompt_loss: prompt_loss applies to sft",
                "data.format: data.format names sft row formats"):
        assert key in msg, msg
    assert "train.micro_batch: kto estimates its KL term" in _err(scenario(
        "{kind: kto}", train="{micro_batch: 1, steps: 4, warmup_steps: 1}"))


def test_a_framework_without_the_objective_is_refused_with_its_reason():
    msg = _err(scenario("{kind: dpo}", frameworks="[hf]"))
    assert ("frameworks[0]: hf cannot run this scenario: objective 'dpo' not supported (supports ['sft']): the plain "
            "Trainer trains sft only; dpo, orpo, kto and grpo run through TRL (framework trl)") in msg, msg
    parse_scenario(scenario("{kind: dpo}", frameworks="[trl]"), "s.yaml")


def test_data_files_are_checked_for_the_objective(tmp_path):
    labelled = tmp_path / "kto.jsonl"
    labelled.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    msg = _err(scenario("{kind: dpo}", data=f"{{source: jsonl, path: {labelled}, seq_len: 32}}"))
    assert "data.path: " in msg and "objective dpo reads pairs rows (prompt, chosen, rejected)" in msg
    parse_scenario(scenario("{kind: kto}", data=f"{{source: jsonl, path: {labelled}, seq_len: 32}}"), "s.yaml")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{oops\n")
    assert "broken.jsonl:2: not JSON" in _err(scenario("{kind: dpo}", data=f"{{source: jsonl, path: {broken}, "
                                                                           "seq_len: 32}"))
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "x" * 40, "chosen": "a", "rejected": "b"}) + "\n")
    assert "every prompt fills data.seq_len (32 tokens)" in _err(scenario(
        "{kind: dpo}", data=f"{{source: jsonl, path: {long_prompt}, seq_len: 32}}"))
    sc = parse_scenario(scenario("{kind: dpo}", data=f"{{source: jsonl, path: {long_prompt}, seq_len: 42}}"),
                        "s.yaml")
    assert any("1 of 1 rows are cut at seq_len (42 tokens)" in n for n in sc.notes), sc.notes
    assert "objective.eval_pairs: file 'nowhere.jsonl' not found" in _err(scenario(
        "{kind: dpo, eval_pairs: nowhere.jsonl}"))
    assert "objective.eval_pairs: " in _err(scenario(f"{{kind: dpo, eval_pairs: {labelled}}}"))


# -- rows ----------------------------------------------------------------------------------------------------------


def test_row_forms_and_problems():
    assert pref.row_form({"prompt": "p", "chosen": "a", "rejected": "b"}) == pref.PAIRS
    assert pref.row_form({"prompt": "p", "completion": "a", "label": False}) == pref.LABELLED
    assert pref.row_form({"prompt": "p", "answer": "a"}) == pref.PROMPTS
    assert pref.row_form({"instruction": "i", "input": "", "output": "o"}) == pref.ALPACA
    with pytest.raises(ValueError, match="none of prompt/chosen/rejected"):
        pref.row_form({"text": "x"})
    assert pref.row_problem({"prompt": "p", "chosen": "a", "rejected": "a"}, pref.PAIRS) == \
        "has chosen == rejected: nothing to prefer"
    assert pref.row_problem({"prompt": "p", "completion": "a", "label": "yes"}, pref.LABELLED) == \
        "'label' is str, not bool"
    assert pref.row_problem({"prompt": "", "answer": "a"}, pref.PROMPTS) == "has an empty prompt"


def test_conversions():
    pairs = [{"prompt": "p1", "chosen": "a", "rejected": "b", "extra": 1}, {"prompt": "p2", "chosen": "c",
                                                                             "rejected": "d"}]
    assert pref.convert(pairs, pref.PAIRS, "dpo") == [{"prompt": "p1", "chosen": "a", "rejected": "b"},
                                                      {"prompt": "p2", "chosen": "c", "rejected": "d"}]
    assert [(r["completion"], r["label"]) for r in pref.convert(pairs, pref.PAIRS, "kto")] == \
        [("a", True), ("b", False), ("c", True), ("d", False)]
    assert pref.convert(pairs, pref.PAIRS, "grpo") == [{"prompt": "p1", "answer": "a"}, {"prompt": "p2", "answer": "c"}]
    alpaca = [{"instruction": "Add the numbers.", "input": "1+2", "output": "3"}]
    assert pref.convert(alpaca, pref.ALPACA, "grpo") == [
        {"prompt": "### Instruction:\nAdd the numbers.\n\n### Input:\n1+2\n\n### Response:\n", "answer": "3"}]
    with pytest.raises(ValueError, match="objective dpo reads pairs rows"):
        pref.convert(alpaca, pref.ALPACA, "dpo")


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_synthetic_pairs_fill_seq_len_exactly(kind):
    sc = parse_scenario(scenario(f"{{kind: {kind}}}", data="{source: synthetic, seq_len: 64}",
                                 train="{micro_batch: 2, grad_accum: 2, steps: 3, warmup_steps: 1}"), "s.yaml")
    rows, form, _, passes = pref.build_rows(sc)
    assert form == pref.FORM_OF[kind] and passes == 1
    assert len(rows) == 12  # samples the steps consume: 3 x 2 x 2 (KTO: labelled rows, 6 pairs unpaired)
    for r in rows:
        for completion in ([r["chosen"], r["rejected"]] if kind == "dpo" else [r["completion"]]):
            assert 1 + len(r["prompt"].encode()) + len(completion.encode()) + 1 == 64  # <bos> + text + <eos>
    assert pref.build_rows(sc) == (rows, form, 0, 1)  # deterministic in data.seed


def test_jsonl_rows_are_converted_and_cut_in_the_objectives_units():
    sc = parse_scenario(scenario("{kind: kto}", data=f"{{source: jsonl, path: {PAIRS_FILE}, seq_len: 96, "
                                                     "num_samples: 5}"), "s.yaml")
    rows, form, _, passes = pref.build_rows(sc)
    # the steps read 2 x 1 x 4 = 8 rows (the scenario's default train): the 5 are read twice, in order
    assert form == pref.LABELLED and passes == 2 and len(rows) == 10
    assert [r["label"] for r in rows[:5]] == [True, False, True, False, True] and rows[5:] == rows[:5]
    # validate says so, counting the file's rows in the same units (KTO: two rows a pair, then num_samples)
    _, notes = pref.check_file(Path(PAIRS_FILE), "p.jsonl", "kto", 96, num_samples=5, needed=8)
    assert "p.jsonl: the steps read more than its 5 rows hold: every framework reads them 2 times over" in notes[0]
    assert not any("times over" in n for n in pref.check_file(Path(PAIRS_FILE), "p.jsonl", "kto", 96, needed=8)[1])


def test_exact_match_reward_scores_the_first_line():
    got = pref.exact_match_reward(["92", "92\nmore", " 92", "93", [{"role": "assistant", "content": "7"}]],
                                  answer=["92", "92", "92", "92", "7"], prompts=["p"] * 5)
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]


# -- the task generator ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    assert task_files.main(["generate", "--out", str(out)]) == 0
    return out


def test_generated_files_are_the_shipped_ones(generated):
    for path in sorted(generated.iterdir()):
        assert path.read_bytes() == (TASKS / path.name).read_bytes(), path.name


def test_pairs_are_plausible_and_held_out(generated):
    read = lambda name: [json.loads(line) for line in (generated / name).read_text().splitlines()]  # noqa: E731
    train, held_out = read("tb_pref_last.jsonl"), read("tb_pref_eval_last.jsonl")
    assert len(train) == 4800 and len(held_out) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    _, _, by_family = generate(list(FAMILIES), 6000, 100, 0, 4800, ["last", "add"])  # the CLI's defaults
    for row, ex in zip(train, by_family["last"], strict=True):
        assert row["chosen"] == ex.output and row["rejected"] in ex.distractors and row["prompt"].endswith(
            f"### Input:\n{ex.input}\n\n### Response:\n")
    kto = read("tb_kto_last.jsonl")
    assert len(kto) == len(train) and [r["label"] for r in kto[:4]] == [True, False, True, False]
    assert all(r["completion"] == (p["chosen"] if r["label"] else p["rejected"]) for r, p in zip(kto, train,
                                                                                               strict=True))
    prompts = read("tb_prompts_add.jsonl")
    assert len(prompts) == 1000 and all(str(eval(r["prompt"].split("Input:\n")[1].split("\n")[0])) == r["answer"]
                                        for r in prompts)


def test_shipped_objective_scenarios_validate():
    for name in ("quality_dpo_small", "llama8b_dpo", "llama8b_orpo", "llama8b_kto", "grpo_small"):
        sc = load_scenario(REPO / "scenarios" / f"{name}.yaml")
        assert not sc.objective.is_sft and "trl" in sc.framework_names(), name


def test_objective_rows_keep_the_fields_of_their_form_in_order():
    pair = {"prompt": "p", "chosen": "c", "rejected": "r", "id": 3}
    assert pref.objective_rows([pair, pair], "orpo") == [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2
    assert pref.objective_rows([{"prompt": "p", "answer": "a", "extra": 1}], "grpo") == [
        {"prompt": "p", "answer": "a"}]
    labelled = [{"prompt": "p", "completion": "c", "label": b, "x": 0} for b in (True, False)]
    assert [r["label"] for r in pref.objective_rows(labelled, "kto")] == [True, False]
