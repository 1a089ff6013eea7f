"""Quality side: synthetic tasks, lm-eval evaluation of saved outputs, intermediate saves, time to target.

The end-to-end test runs ``scenarios/quality_small.yaml`` through the real runner (hf and dummy train a tiny
model from scratch, then ``python -m harness.analysis.evaluate`` scores the saved outputs with lm-eval): ~2 min on
2 idle cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from harness.analysis import evaluate
from harness.inputs.data import ALPACA_PROMPT
from harness.inputs.tasks import FAMILIES, generate
from harness.inputs.tasks.files import eval_row, write
from harness.spec.scenario import ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
QUALITY_SMALL = REPO / "scenarios" / "quality_small.yaml"
TASK_DIR = REPO / "scenarios" / "tasks"


# -- the task generator ----------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_eval_is_held_out():
    fams = list(FAMILIES)
    a = generate(fams, 300, 20, seed=3, n_train_family=50, single=["last"])
    b = generate(fams, 300, 20, seed=3, n_train_family=50, single=["last"])
    assert a == b
    train, evals, by_family = a
    held_out = {(e.instruction, e.input) for e in evals}
    assert not held_out & {(e.instruction, e.input) for e in train + by_family["last"]}
    assert len(held_out) == len(evals) == 20 * len(fams)
    assert generate(fams, 300, 20, seed=4)[0] != train  # the seed matters


def _solve(family: str, x: str) -> str:
    """The rule of each family, written independently of the generator."""
    if family == "recall":
        pairs, key = x.split("; ")
        return dict(kv.split("=") for kv in pairs.split())[key]
    return {"last": lambda: x[-1], "first": lambda: x[0], "reverse": lambda: x[::-1], "upper": x.upper,
            "sort": lambda: " ".join(sorted(x.split())),
            "add": lambda: str(sum(int(n) for n in x.split("+")))}[family]()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_examples_are_correct_and_distractors_plausible(family):
    rng = random.Random(0)
    for _ in range(200):
        ex = FAMILIES[family](rng)
        assert len(ex.distractors) == 3 and len(set(ex.distractors)) == 3 and ex.output not in ex.distractors
        # same length as the answer: multiple choice can't be won by answer length alone
        assert all(len(d) == len(ex.output) for d in ex.distractors)
        assert ex.output == _solve(family, ex.input)


def test_eval_rows_use_the_training_prompt():
    ex = FAMILIES["last"](random.Random(1))
    row = eval_row(ex, random.Random(0))
    assert row["prompt"] == ALPACA_PROMPT.format(instruction=ex.instruction, input=ex.input)
    assert row["choices"][row["gold"]] == ex.output and sorted(row["choices"]) == sorted([ex.output, *ex.distractors])


def test_shipped_task_files_are_what_the_generator_writes(tmp_path):
    """scenarios/tasks/ is generated: regenerating with the defaults reproduces it byte for byte."""
    from harness.inputs.tasks.files import main

    assert main(["generate", "--out", str(tmp_path)]) == 0
    shipped = sorted(p.name for p in TASK_DIR.iterdir() if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes(), name
    gen = yaml.load((TASK_DIR / "tb_last_gen.yaml").read_text().replace("!function", ""), Loader=yaml.SafeLoader)
    assert gen["generation_kwargs"]["until"] == ["<|end_of_text|>", "\n"] and gen["output_type"] == "generate_until"
    assert {"tb_last_gen", "tb_last_mc", "tb_mix_gen", "tb_mix_mc"} <= evaluate.local_task_names()


def test_write_small(tmp_path):
    paths = write(tmp_path, ["last", "add"], 10, 3, seed=0, single=["add"], n_train_family=5)
    names = {p.name for p in paths}
    assert {"tb_train.jsonl", "tb_train_add.jsonl", "tb_eval.jsonl", "tb_tasks.py", "tb_add_mc.yaml",
            "tb_mix_gen.yaml"} <= names
    assert len((tmp_path / "tb_eval.jsonl").read_text().splitlines()) == 6


# -- evaluator pieces ------------------------------------------------------------------------------------------


def test_flatten_results_keeps_lm_eval_metric_names():
    res = {"t1": {"alias": "t1", "name": "t1", "sample_len": 5, "exact_match,none": 0.5,
                  "exact_match_stderr,none": 0.1, "acc,strict": 1.0, "acc_stderr,strict": "N/A"}}
    metrics, stderr = evaluate.flatten_results(res)
    assert metrics == {"t1/exact_match": 0.5, "t1/acc,strict": 1.0}
    assert stderr == {"t1/exact_match": 0.1}


def test_time_to_target_counts_training_and_every_evaluation_so_far():
    hist = [{"step": 50, "train_s": 10.0, "wall_s": 2.0, "metrics": {"t/acc": 0.4}},
            {"step": 100, "train_s": 20.0, "wall_s": 3.0, "metrics": {"t/acc": 0.95, "t/em": 0.5}},
            {"step": 150, "train_s": 30.0, "wall_s": 4.0, "metrics": {"t/acc": 0.97, "t/em": 0.9}}]
    assert evaluate.time_to_target(hist, {"t/acc": 0.9}) == 20.0 + 2.0 + 3.0
    assert evaluate.time_to_target(hist, {"t/acc": 0.9, "t/em": 0.8}) == 30.0 + 9.0
    assert evaluate.time_to_target(hist, {"t/acc": 0.99}) is None
    assert evaluate.time_to_target(hist, {"t/missing": 0.0}) is None


def test_model_args_peft_full_and_base(tmp_path):
    sc = load_scenario(QUALITY_SMALL)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert evaluate.model_args(sc, "/ck", str(tmp_path / "lora"))["peft"] == str(tmp_path / "lora")
    full = evaluate.model_args(sc, "/ck", str(tmp_path / "full"))
    assert full["pretrained"] == str(tmp_path / "full") and "peft" not in full and full["tokenizer"] == "/ck"
    base = evaluate.model_args(sc, "/ck", None)
    assert base["pretrained"] == "/ck" and base["add_bos_token"] is True and base["device"] == "cpu"


def test_eval_spec_validation():
    text = QUALITY_SMALL.read_text()
    with pytest.raises(ScenarioError, match="target"):
        parse_scenario(text.replace("tb_last_mc/acc: 0.9", "tb_nope/acc: 0.9"), str(QUALITY_SMALL))
    with pytest.raises(ScenarioError, match="need `tasks`"):
        parse_scenario(text.replace("tasks: [tb_last_gen, tb_last_mc]", "tasks: []"), str(QUALITY_SMALL))


def test_intermediate_dir_schedule(tmp_path):
    from adapters_for_tools.contract import RunContext

    sc = load_scenario(QUALITY_SMALL)  # every_steps 50, steps 200
    ctx = RunContext(scenario=sc, framework="x", overrides={}, repeat=0, checkpoint="", dataset_path=tmp_path,
                     work_dir=tmp_path, output_dir=tmp_path / "output", device="cpu", meter=None)
    due = [s for s in range(0, 201) if ctx.intermediate_dir(s) is not None]
    assert due == [50, 100, 150]  # not 200: the final output stands for the last step
    assert (tmp_path / "intermediate" / "step-000050").is_dir()


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quality_sweep(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from harness.running.runner import run_sweep
    from harness.storing import results

    tmp = tmp_path_factory.mktemp("quality")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEBENCH_CACHE", str(tmp / "cache"))
    mp.setenv("TUNEBENCH_WORK", str(tmp / "work"))
    try:
        sweep = run_sweep(load_scenario(QUALITY_SMALL), tmp / "results", quiet=True)
        yield {"sweep": sweep, "runs": {r["framework"]: r for r in results.load_runs(sweep)}, "tmp": tmp}
    finally:
        mp.undo()


@pytest.mark.slow
def test_trained_model_beats_untrained_by_lm_eval(quality_sweep):
    runs = quality_sweep["runs"]
    assert set(runs) == {"hf", "dummy", "tunebench", "trl"}
    for fw, r in runs.items():
        assert r["status"] == "ok", (fw, r.get("reason"))
        ev = r["eval"]
        assert ev["status"] == "ok", (fw, ev.get("error"), ev.get("traceback"))
        assert ev["lm_eval_version"]
        # lm-eval's metric names, on the scenario's local tasks
        assert set(ev["metrics"]) == {"tb_last_gen/exact_match", "tb_last_mc/acc"}
        assert set(ev["baseline_metrics"]) == set(ev["metrics"])
        base, final = ev["baseline_metrics"], ev["metrics"]
        # random weights: no exact answers, multiple choice at chance (0.25 over 100 documents)
        assert base["tb_last_gen/exact_match"] <= 0.05 and base["tb_last_mc/acc"] <= 0.4
        # trained (measured: 1.0 and 1.0 by step 100); clearly above the untrained model
        assert final["tb_last_gen/exact_match"] >= 0.8 and final["tb_last_mc/acc"] >= 0.8, (fw, final)


@pytest.mark.slow
def test_history_and_time_to_target(quality_sweep):
    for fw, r in quality_sweep["runs"].items():
        ev = r["eval"]
        hist = ev["history"]
        assert [h["step"] for h in hist] == [50, 100, 150, 200], fw
        assert hist[-1]["metrics"] == ev["metrics"]
        step_s = [s["step_s"] for s in r["steps"]]
        for h in hist:
            assert math.isclose(h["train_s"], math.fsum(step_s[: h["step"]]), rel_tol=1e-9)
            assert h["wall_s"] > 0
        k = next(i for i, h in enumerate(hist) if evaluate.reaches(h["metrics"], ev["target"]))
        want = hist[k]["train_s"] + math.fsum(h["wall_s"] for h in hist[: k + 1])
        assert ev["time_to_target_s"] == pytest.approx(want)
        assert ev["target"] == {"tb_last_mc/acc": 0.9, "tb_last_gen/exact_match": 0.8}
        # the saves happened outside the timed steps, at the scheduled steps
        assert [s["step"] for s in r["extra"]["intermediate_saves"]] == [50, 100, 150]


@pytest.mark.slow
def test_baseline_is_evaluated_once_per_sweep(quality_sweep):
    cached = sorted(r["eval"]["baseline_cached"] for r in quality_sweep["runs"].values())
    assert cached == [False] + [True] * (len(quality_sweep["runs"]) - 1)  # computed by the first run only
    files = list((quality_sweep["tmp"] / "work" / evaluate.BASELINE_CACHE).glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["metrics"] == quality_sweep["runs"]["hf"]["eval"]["baseline_metrics"]
