"""``python -m harness validate`` on hostile input: every file gets ``file:line: key: reason`` and exit 2, never a
traceback, a hang or unbounded memory; every shipped scenario still validates.

The corpus is ``tests/harness/hostile/`` (one small scenario per case, its first line says what it tries, and the
data files they name); the large or binary cases are generated here.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_scenario import GOOD  # the smallest valid scenario, the base of hostile variants

from harness.cli import main as cli
from harness.inputs.data import IGNORE_INDEX, tokenize_example
from harness.spec import yamlsafe
from harness.spec.datacheck import check_jsonl, row_tokens
from harness.spec.scenario import ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
HOSTILE = REPO / "tests" / "harness" / "hostile"

# corpus file -> what its message must name (the key, or the line and "<yaml>"/"<file>")
EXPECTED = {
    "alias_bomb": ":3: <yaml>: anchors and aliases",
    "merge_alias": ":12: <yaml>: anchors and aliases",
    "duplicate_key": ":15: train.steps: duplicate key 'steps' (first at line 14)",
    "duplicate_section": ":19: train: duplicate key 'train' (first at line 12)",
    "python_tag": ":3: <yaml>: could not determine a constructor",
    "set_tag": ":18: <yaml>: a YAML set is not supported",
    "date_value": ":4: <yaml>: a YAML timestamp is not supported",
    "two_documents": ":19: <yaml>: expected a single document",
    "not_a_mapping": ":1: <top>: a scenario is a YAML mapping",
    "syntax_error": ":19: <yaml>: while parsing a flow sequence",
    "tab_indent": ":9: <yaml>:",
    "huge_integer": ":14: <yaml>: cannot read this value",
    "lr_inf": ":16: train.lr: Input should be a finite number",
    "lr_nan": ":16: train.lr: Input should be a finite number",
    "lr_too_large": ":16: train.lr: Input should be less than or equal to 10",
    "steps_huge": ":14: train.steps: Input should be less than or equal to 1000000",
    "seq_len_huge": ":11: data.seq_len: Input should be less than or equal to 1048576",
    "micro_batch_huge": ":13: train.micro_batch: Input should be less than or equal to 65536",
    "timeout_huge": ":20: measure.timeout_s: Input should be less than or equal to 604800",
    "seed_negative": ":7: model.seed: Input should be greater than or equal to 0",
    "synthetic_too_large": ":14: train.steps: 65,536,000,000 synthetic samples",
    "target_inf": ":21: eval.target.tb_last_mc/acc: Input should be a finite number",
    "override_nan": ":18: frameworks.hf.overrides.training_args.adam_beta1: nan is not a finite number",
    "name_dotdot": ":3: name: '..' cannot be a file name",
    "name_dot": ":3: name: '.' cannot be a file name",
    "name_too_long": ":3: name: String should have at most 100 characters",
    "name_slash": ":3: name: String should match pattern",
    "label_dotdot": ":18: frameworks[0].label: '..' cannot be a file name",
    "label_too_long": ":18: frameworks[0].label: String should have at most 100 characters",
    "baseline_hf_absent": ":20: measure.baseline: unknown baseline framework 'hf' (the scenario's frameworks: trl)",
    "baseline_unknown": ":20: measure.baseline: unknown baseline framework 'trl' (the scenario's frameworks: hf)",
    "eval_task_unknown": ":20: eval.tasks[1]: unknown eval task 'no_such_task_anywhere'",
    "override_parent_dir": ":18: frameworks.hf.overrides.training_args.output_dir: '../../results' climbs out",
    "override_absolute": ":18: frameworks.hf.overrides.training_args.logging_dir: '/tmp/elsewhere' is an absolute",
    "weights_missing": ":5: model.weights: checkpoint path './no/such/checkpoint' does not exist",
    "weights_not_dir": ":5: model.weights: './tests/harness/hostile/data/empty.jsonl' is not a directory",
    "weights_no_files": ":5: model.weights: checkpoint './tests/harness/hostile/checkpoint_no_weights' has no weight",
    "data_path_nul": ":12: data.path: a path cannot hold a NUL character",
    "data_path_part_too_long": ":12: data.path: a path part longer than 255 bytes",
    "data_directory": ":12: data.path: 'data' is a directory, not a JSONL file",
    "data_device": ":12: data.path: '/dev/zero' is not a regular file",
    "data_not_jsonl": ":12: data.path: data/table.csv:1: not JSON",
    "data_broken_line": ":12: data.path: data/broken_line.jsonl:2: not JSON",
    "data_empty": ":12: data.path: 'data/empty.jsonl' has no rows",
    "data_not_object": ":12: data.path: data/list_rows.jsonl:1: a row is a JSON object, got a list",
    "data_missing_field": ":12: data.path: data/missing_output.jsonl:2: alpaca row misses field 'output'",
    "data_wrong_format": ":12: data.path: data/alpaca.jsonl:1: text row misses field 'text'",
    "data_unknown_format": ":12: data.path: data/unknown_format.jsonl:1: cannot tell the format",
    "data_sharegpt_speaker": ":12: data.path: data/sharegpt_speaker.jsonl:1: sharegpt row conversations[1].from",
    "data_messages_content": ":12: data.path: data/messages_content.jsonl:1: messages row messages[1] needs text",
    "data_no_loss": ":12: data.path: none of the 3 rows of 'data/long_prompts.jsonl' keeps a loss-bearing token",
    # YAML that reads as something else than it shows; values of another type than the key takes
    "merge_key": ":13: train.<<: merge keys (<<) are not supported",
    "key_not_text": ":16: train.yes: key 'yes' reads as a boolean, not as text: quote it",
    "quoted_number": ":14: train.steps: Input should be a valid integer, got the text '4' (a number in quotes is text",
    "whole_float": ":13: train.micro_batch: Input should be a valid integer, got the number 2.0",
    "bool_number": ":13: train.micro_batch: Input should be a valid integer, got true (a boolean)",
    "quoted_bool": ":16: train.gradient_checkpointing: Input should be a valid boolean, got the text 'no'",
    "source_path_key": ":4: source_path: unknown key (set by tunebench",
    "targets_empty": ":10: method.target_modules: List should have at least 1 item",
    "targets_repeated": ":10: method.target_modules: 'q_proj' listed twice",
    "section_not_mapping": ":16: hardware: Input should be a mapping (key: value lines, indented below the key), got "
                           "the text 'cpu'",
    "empty": ":1: <top>: a scenario is a YAML mapping (version, name, model, method, data, train, frameworks, ...), "
             "got an empty document",
}


def _validate(*files: Path | str, limits: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m harness validate FILES`` from the repository root; with ``limits``, in 1 GiB of address space."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "harness", "validate", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap if limits else None)


def _assert_rejected(r: subprocess.CompletedProcess, path: Path | str, expected: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"{path}{expected}" in r.stderr, r.stderr


def test_the_corpus_is_covered():
    assert sorted(p.stem for p in HOSTILE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_is_rejected_with_its_line(name):
    path = HOSTILE.relative_to(REPO) / f"{name}.yaml"
    _assert_rejected(_validate(path), path, EXPECTED[name])


def test_every_shipped_scenario_validates():
    shipped = sorted((REPO / "scenarios").glob("*.yaml"))
    r = _validate(*shipped)
    assert r.returncode == 0, r.stderr
    assert all(f"{p}: ok" in r.stdout for p in shipped), r.stdout
    # the quality scenarios' data is read and counted: the longest row of the last-letter set is 75 tokens
    assert "tasks/tb_train_last.jsonl: 4800 rows (alpaca), the longest 75 tokens" in r.stdout


# --- generated: binary, other encodings, too large, too deep ----------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ":1: <file>: not UTF-8 text (byte 0x89 at offset 0)"),
    (GOOD.replace("name: t\n", "name: t\ndescription: caf\xe9\n").encode("latin-1"),
     ":3: <file>: not UTF-8 text (byte 0xe9"),
    (GOOD.encode("utf-16"), ":1: <file>: not UTF-8 text"),
    (GOOD.replace("name: t", "name: t\x00").encode(), ":2: <yaml>: character U+0000 is not allowed"),
    (GOOD.replace("name: t", "name: t\x1b[31m").encode(), ":2: <yaml>: character U+001B is not allowed"),
    (b"a: 1\n" * 60_000, ":0: <file>: larger than 256 KiB"),
])
def test_bytes_that_are_no_scenario(tmp_path, content, expected):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    _assert_rejected(_validate(path), path, expected)


def test_not_a_regular_file(tmp_path):
    _assert_rejected(_validate(tmp_path), tmp_path, ":0: <file>: is a directory")
    _assert_rejected(_validate("/dev/zero"), "/dev/zero", ":0: <file>: not a regular file")
    _assert_rejected(_validate("n" * 300), "n" * 300, ":0: <file>: File name too long")


@pytest.mark.parametrize(("text", "expected"), [
    ("a: " + "[" * 10_000 + "]" * 10_000 + "\n", ":1: <yaml>: nested deeper than 32 levels"),
    ("a: " + "{b: " * 10_000 + "1" + "}" * 10_000 + "\n", ":1: <yaml>: nested deeper than 32 levels"),
    ("".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "x: 1\n", ":32: <yaml>: nested deeper than 32"),
    # a 'billion laughs' of 1.6 KB: 10^9 strings if the aliases were expanded
    ("\n".join([f'l0: &l0 [{", ".join(["lol"] * 9)}]']
               + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)])
     + "\nversion: 1\n" + "\n".join(f"x{i}: [{', '.join(['*l9'] * 9)}]" for i in range(12)) + "\n",
     ":1: <yaml>: anchors and aliases"),
])
def test_bombs_end_in_seconds_and_bounded_memory(tmp_path, text, expected):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    _assert_rejected(_validate(path, limits=True, timeout=30), path, expected)


def test_thousands_of_problems_are_capped(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(GOOD.replace("frameworks: [hf]", "frameworks: [" + ", ".join(["hf"] * 20_000) + "]"))
    r = _validate(path, limits=True, timeout=30)
    _assert_rejected(r, path, ":17: frameworks[1]: framework 'hf' listed twice")
    assert "... and 19969 more problems" in r.stderr
    assert len(r.stderr.splitlines()) == 31


def test_every_file_is_reported_and_the_bad_ones_exit_2(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bomb = HOSTILE / "alias_bomb.yaml"
    r = _validate(binary, good, bomb, tmp_path / "missing.yaml")
    _assert_rejected(r, binary, ":1: <file>: not UTF-8 text")
    assert f"{good}: ok (t: tiny-llama, lora, frameworks hf)" in r.stdout
    assert f"{bomb}:3: <yaml>: anchors and aliases" in r.stderr
    assert f"{tmp_path / 'missing.yaml'}:0: <file>: no such file" in r.stderr


def test_run_rejects_the_same_files(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", str(HOSTILE / "data_missing_field.yaml"),
                        "--results", str(tmp_path / "results"), "--no-report"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data/missing_output.jsonl:2: alpaca row misses field 'output'" in r.stderr
    assert not (tmp_path / "results").exists()  # nothing started


def test_internal_error_names_the_file_and_goes_on(tmp_path, monkeypatch, capsys):
    from harness.cli import validate

    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    real = validate.load_scenario

    def flaky(path):
        if Path(path).name == "boom.yaml":
            raise RuntimeError("a bug in validation")
        return real(path)

    monkeypatch.setattr(validate, "load_scenario", flaky)  # what both validate and run call
    assert cli.main(["validate", str(tmp_path / "boom.yaml"), str(good)]) == 2
    out = capsys.readouterr()
    assert f"{tmp_path / 'boom.yaml'}: internal error while validating: RuntimeError: a bug in validation" in out.err
    assert f"{good}: ok" in out.out
    assert cli.main(["run", str(tmp_path / "boom.yaml")]) == 2
    assert "boom.yaml: internal error while validating: RuntimeError: a bug in validation" in capsys.readouterr().err


# --- the checks themselves ----------------------------------------------------------------------------------------


def test_yaml_loader_records_lines_and_refuses_duplicates():
    data, lines = yamlsafe.load("a:\n  b: 1\n  c: [x, {d: 2}]\n")
    assert data == {"a": {"b": 1, "c": ["x", {"d": 2}]}}
    assert lines[("a",)] == 1 and lines[("a", "b")] == 2 and lines[("a", "c", 1, "d")] == 3
    with pytest.raises(yamlsafe.YamlError) as e:
        yamlsafe.load("a: 1\nb:\n  x: 1\n  x: 2\na: 3\n")
    assert [(line, loc) for line, loc, _ in e.value.problems] == [(4, ("b", "x")), (5, ("a",))]


def test_scenario_name_bounds_and_numbers_finite():
    assert parse_scenario(GOOD.replace("name: t", "name: " + "n" * 100), "s.yaml").name == "n" * 100
    assert parse_scenario(GOOD.replace("name: t", "name: v1..2"), "s.yaml").name == "v1..2"
    with pytest.raises(ScenarioError, match="model.seed: Input should be less than or equal to 4294967295"):
        parse_scenario(GOOD.replace("  dtype: float32", "  dtype: float32\n  seed: 4294967296"), "s.yaml")


def test_default_baseline_may_be_absent_a_named_one_may_not():
    only_dummy = GOOD.replace("frameworks: [hf]", "frameworks: [dummy]")
    assert parse_scenario(only_dummy, "s.yaml").measure.baseline == "hf"  # the report then shows no speed-up
    assert parse_scenario(only_dummy + "measure:\n  baseline: dummy\n", "s.yaml").measure.baseline == "dummy"


def test_overrides_inside_the_run_directory_pass():
    text = GOOD.replace("frameworks: [hf]", "frameworks: [{name: hf, overrides: {training_args: "
                                            "{output_dir: out/tool, logging_dir: ./logs}}}]")
    assert parse_scenario(text, "s.yaml").frameworks[0].overrides["training_args"]["output_dir"] == "out/tool"


def test_local_checkpoint_with_sharded_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    text = GOOD.replace("  preset: tiny-llama\n", f"  weights: {ckpt}\n")
    with pytest.raises(ScenarioError, match=r"model.weights: model.safetensors.index.json of .* names shards that "
                                            r"are missing: \['model-00002-of-00002.safetensors'\]"):
        parse_scenario(text, "s.yaml")
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert parse_scenario(text, "s.yaml").model.weights == str(ckpt)


def test_data_notes_count_truncated_rows(tmp_path):
    rows = [{"instruction": "q" * n, "output": "answer"} for n in (1, 25, 50, 80)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.yaml").write_text(GOOD.replace("  seq_len: 64", "  source: jsonl\n  path: d.jsonl\n  seq_len: 64"))
    sc = load_scenario(tmp_path / "s.yaml")
    # <bos> + the alpaca prompt without input (33 bytes + the instruction) + 6 answer bytes + <eos>: 66 tokens for
    # n = 25 keep 5 answer tokens at seq_len 64; n = 50 and 80 keep none
    assert sc.notes == ["d.jsonl: 4 rows (alpaca), the longest 121 tokens; 3 longer than seq_len 64, cut there; "
                        "2 of them keep no loss-bearing token (left out: they would train on nothing)",
                        # the 2 rows kept against the 4 x 2 the steps read
                        "d.jsonl: the steps read more than its 2 rows hold: every framework reads them 4 times "
                        "over, in order (no short step at an epoch's end)"]
    r = _validate(tmp_path / "s.yaml")
    assert r.returncode == 0 and "  d.jsonl: 4 rows (alpaca)" in r.stdout
    # another tokenizer (a local checkpoint): bytes bound its tokens, so the counts are bounds and nothing fails
    found = check_jsonl(tmp_path / "d.jsonl", "d.jsonl", None, 40, exact_tokens=False)
    assert found.problems == []
    assert found.notes == ["d.jsonl: 4 rows (alpaca), the longest 121 UTF-8 bytes (with <bos>/<eos>); up to 4 longer "
                           "than seq_len 40 (bytes bound a byte-level BPE tokenizer's tokens), cut there; up to 3 of "
                           "them with no loss-bearing token left (left out)"]


def test_rows_without_loss_are_left_out_of_the_dataset(tmp_path):
    """The rows the note counts are left out of the dataset every framework reads (of the first num_samples): a
    step of them would train nothing and log a loss of 0."""
    from harness.inputs import data
    from harness.inputs.models import build_tokenizer  # transformers: heavy

    rows = [{"instruction": "q" * n, "output": "answer"} for n in (1, 25, 50, 80, 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.yaml").write_text(GOOD.replace("  seq_len: 64", "  source: jsonl\n  path: d.jsonl\n  seq_len: 64"))
    sc = load_scenario(tmp_path / "s.yaml")
    tok = build_tokenizer(300)
    # the steps read 4 x 2 = 8 rows, so the rows kept are read whole, in order, until they cover them
    kept, fmt, dropped, passes = data.build_examples(sc, tok)
    assert (kept, fmt, dropped, passes) == ([rows[0], rows[1], rows[4]] * 3, "alpaca", 2, 3)
    assert data.build_examples(sc) == (rows * 2, "alpaca", 0, 2)  # without the tokenizer: the file as it is
    assert all(data.bears_loss(data.tokenize_example(tok, r, fmt, 64)) for r in kept)
    sc.data.num_samples = 3  # of the first three, the one with n = 50 goes
    assert data.build_examples(sc, tok)[::2] == ([rows[0], rows[1]] * 4, 1)
    sc.data.num_samples, sc.data.seq_len = None, 20  # every prompt fills the row
    with pytest.raises(ValueError, match="no row keeps a loss-bearing token within data.seq_len 20"):
        data.build_examples(sc, tok)


@pytest.mark.parametrize(("row", "fmt"), [
    ({"instruction": "Say é日本", "input": "x", "output": "ab ç"}, "alpaca"),
    ({"instruction": "q" * 70, "output": "a"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "hi ü"}, {"role": "assistant", "content": "hello 🙂"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"text": "plain text"}, "text"),
])
def test_token_count_is_the_generated_tokenizers(row, fmt):
    from harness.inputs.models import build_tokenizer  # transformers: heavy

    tok = build_tokenizer(300)
    for seq_len in (8, 20, 64, 300):
        for prompt_loss in (False, True):
            full = tokenize_example(tok, row, fmt, 1 << 20, prompt_loss)
            cut = tokenize_example(tok, row, fmt, seq_len, prompt_loss)
            loss = sum(label != IGNORE_INDEX for label in cut["labels"][1:])  # the model predicts positions 1..
            assert row_tokens(row, fmt, seq_len, prompt_loss) == (len(full["input_ids"]), loss)


# --- the other commands: options and stored files that cannot be used fail before anything runs, with exit 2 ----------


def test_run_refuses_contradictory_options_and_unwritable_folders_before_running(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert cli.main(["run", str(good), "--new", "--resume"]) == 2
    assert "--new starts a new sweep; --resume and --retry-failed work on the newest one" in capsys.readouterr().err
    for option in (["--reports", "/dev/null"], ["--results", str(good / "below")]):
        assert cli.main(["run", str(good), "--results", str(tmp_path / "results"), *option]) == 2
        assert f"{good}: --{option[0][2:]} " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # the sweep never started: no hour of runs lost to a bad folder


@pytest.mark.parametrize(("argv", "said"), [
    (["compare", "a", "b", "--tokens-drop", "inf"], "--tokens-drop must be a finite number >= 0, got inf"),
    (["compare", "a", "b", "--noise-k", "1e400"], "--noise-k must be a finite number >= 0, got inf"),
    (["calibrate", "--size", "0"], "calibrate: --size 0: between 16 and 65536"),
    (["history", "--since", "yesterday"], "--since 'yesterday': a date (YYYY-MM-DD)"),
    (["env", "create", "../../etc"], "env create: unknown environment '../../etc'"),
    (["env", "check", "nope"], "env check: unknown environment 'nope'"),
])
def test_bad_options_of_the_other_commands_exit_2(tmp_path, capsys, monkeypatch, argv, said):
    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    assert cli.main(argv) == 2
    assert said in capsys.readouterr().err


def _bundle(path: Path, members: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_env_install_refuses_what_is_no_bundle_and_writes_nowhere(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    (tmp_path / "garbage.tar.xz").write_bytes(b"\x00not a tar" * 50)
    manifest = {"packages": [], "python_version": None}
    cases = {
        str(tmp_path / "missing.tar.xz"): "no such bundle file",
        str(tmp_path): "not a bundle file (a directory)",
        str(tmp_path / "garbage.tar.xz"): "not a bundle of `python -m harness env pack`",
        str(_bundle(tmp_path / "empty.tar.xz", {"x.txt": b"x"})): "no readable manifest.json",
        str(_bundle(tmp_path / "list.tar.xz", {"manifest.json": b"[1]"})): "no readable manifest.json",
        str(_bundle(tmp_path / "climb.tar.xz", {"../../escaped": b"x"})): "not a bundle of",
        str(_bundle(tmp_path / "name.tar.xz", {"manifest.json": json.dumps(manifest | {"env": "../../escaped"})
                                               .encode()})): "'../../escaped' is not an environment name",
    }
    for bundle, said in cases.items():
        assert cli.main(["env", "install", bundle]) == 2, bundle
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert cli.main(["env", "install", str(tmp_path / "name.tar.xz"), "--name", "../x"]) == 2
    assert "--name: '../x' is not an environment name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "x").exists() and not (tmp_path / "envs").exists()


def test_selfcheck_refuses_an_unwritable_out_before_any_loop(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    for out in (tmp_path, good / "check.json"):  # a folder; a path below a file
        assert cli.main(["selfcheck", str(good), "--frameworks", "hf", "--out", str(out)]) == 2
        assert f"selfcheck: --out {out}: not a file that can be written" in capsys.readouterr().err


def test_unknown_names_in_messages_are_bounded(tmp_path):
    rows = ", ".join(f"{{name: hf, label: h{i}}}" for i in range(3000))
    msg = str(pytest.raises(ScenarioError, parse_scenario, GOOD.replace("frameworks: [hf]", f"frameworks: [{rows}]")
                            + "measure: {baseline: nope}\n", "s.yaml").value)
    assert "unknown baseline framework 'nope' (the scenario's frameworks: h0, h1," in msg
    assert "h39, ... (2960 more))" in msg and len(msg) < 1000
    msg = str(pytest.raises(ScenarioError, parse_scenario, GOOD.replace("[hf]", "[" + "x" * 5000 + "]"), "s.yaml")
              .value)
    assert "frameworks[0]: unknown framework 'xxxxxxxx" in msg and len(msg) < 500
    msg = str(pytest.raises(ScenarioError, parse_scenario, GOOD + "trian: {}\n", "s.yaml").value)
    assert "did you mean 'train'?" in msg and "source_path" not in msg  # set by tunebench: not offered as a key


def test_yaml_keys_must_be_text_and_merge_keys_are_refused():
    with pytest.raises(yamlsafe.YamlError) as e:
        yamlsafe.load("a:\n  on: 1\n  1: x\n  null: 2\n? [k]\n: 3\nb: {<<: {c: 1}}\n")
    assert [(line, loc) for line, loc, _ in e.value.problems] == [
        (2, ("a", "on")), (3, ("a", "1")), (4, ("a", "null")), (5, ("<sequence key>",)), (7, ("b", "<<"))]
    assert yamlsafe.load("'on': 1\n'1': 2\n")[0] == {"on": 1, "1": 2}  # quoted: text, as a scenario's keys are


def test_numbers_read_as_json_writes_them_and_quoted_numbers_stay_text():
    data, _ = yamlsafe.load("lr: 1e-4\nbig: 1.0e9\nsteps: 12\nhalf: .5\nquoted: '1e-4'\nword: e9\n")
    assert data == {"lr": 1e-4, "big": 1e9, "steps": 12, "half": 0.5, "quoted": "1e-4", "word": "e9"}
    assert parse_scenario(GOOD.replace("micro_batch: 2", "micro_batch: 2\n  lr: 2e-4"), "s.yaml").train.lr == 2e-4
