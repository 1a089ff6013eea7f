"""The adapter contract: typed overrides, what adapters read from them, the run context, availability."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from adapters_for_tools import registry
from adapters_for_tools.contract import AdapterInfo, Overrides, RunContext, override_names
from harness.running import envs

ADAPTERS_DIR = Path(__file__).resolve().parents[2] / "adapters_for_tools"


@pytest.mark.parametrize("name", registry.names())
def test_every_adapter_declares_strict_typed_overrides(name):
    model = registry.info(name).overrides
    assert issubclass(model, Overrides) and model is not Overrides
    assert model.model_config["extra"] == "forbid" and model.model_config["strict"]
    assert override_names(model), "an adapter with no overrides leaves the base model in place"
    model.model_validate({})  # every override has a default: a row without overrides runs


def _options_read(path: Path) -> set[str]:
    """Attributes read as ``ctx.options.<name>`` (or through a local bound to ``ctx.options``) in a module."""
    tree = ast.parse(path.read_text())
    aliases = {"ctx.options"}
    for node in ast.walk(tree):  # `sc, ov = ctx.scenario, ctx.options` binds ov
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple | ast.Attribute):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values, strict=False):
                if isinstance(t, ast.Name) and ast.unparse(v) == "ctx.options":
                    aliases.add(t.id)
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in aliases}


@pytest.mark.parametrize("name", registry.names())
def test_adapters_read_only_declared_overrides(name):
    model = registry.info(name).overrides
    read = set().union(*(_options_read(p) for p in (ADAPTERS_DIR / name).glob("*.py")))
    assert read <= set(model.model_fields), f"{name} reads overrides its model does not declare: {read}"


def test_overrides_models_type_the_values_adapters_read():
    dummy = registry.info("dummy").overrides.model_validate({"raise": "tool said no", "sleep_s": 2})
    assert dummy.raise_ == "tool said no" and dummy.sleep_s == 2.0 and dummy.loss_scale == 1.0
    unsloth = registry.info("unsloth").overrides
    assert unsloth.model_validate({}).use_gradient_checkpointing is None  # the scenario decides
    assert unsloth.model_validate({"use_gradient_checkpointing": "unsloth"}).use_gradient_checkpointing == "unsloth"
    tb = registry.info("tunebench").overrides.model_validate({"reference_ops": ["rope"], "offload_weights": -1})
    assert tb.reference_ops == ["rope"] and tb.offload_weights == -1 and tb.recompute_layers == -1


def test_check_overrides_locates_each_problem():
    info = registry.info("tunebench")
    assert info.check_overrides({"recompute_layers": 1, "cuda_graph": True}) == []
    problems = dict(info.check_overrides({"recompute_layer": 1, "cuda_graph": "yes", "reference_ops": ["ropee"]}))
    assert set(problems) == {("recompute_layer",), ("cuda_graph",), ("reference_ops", 0)}
    assert problems[("recompute_layer",)].startswith("unknown tunebench override 'recompute_layer'; "
                                                     "did you mean 'recompute_layers'?")
    assert "valid boolean" in problems[("cuda_graph",)]
    unsloth = dict(registry.info("unsloth").check_overrides({"use_gradient_checkpointing": "offload"}))
    assert "'unsloth'" in unsloth[("use_gradient_checkpointing",)]
    assert registry.info("dummy").check_overrides({"raise": "x"}) == []  # a key spelled by its alias


def test_trainer_callbacks_come_from_the_worker(tmp_path):
    ctx = RunContext(scenario=None, framework="x", overrides={}, repeat=0, checkpoint="", dataset_path=tmp_path,
                     work_dir=tmp_path, output_dir=tmp_path / "output", device="cpu", meter=None)
    with pytest.raises(RuntimeError, match="measure_callback is not set"):
        ctx.trainer_callbacks()


def test_unavailable_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_ENVS", str(tmp_path / "envs"))
    missing = AdapterInfo(name="x", description="", requires=("json", "no_such_module_tb"))
    assert envs.unavailable(missing) == ("python packages missing: no_such_module_tb (pip install them, or "
                                         "`python -m harness env create x`)")
    assert envs.unavailable(AdapterInfo(name="y", description="", requires=("json",))) is None
    own_env = AdapterInfo(name="z", description="", env="z_env")
    assert "environment 'z_env' not created" in envs.unavailable(own_env)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever this machine has
    assert envs.unavailable(AdapterInfo(name="w", description=""), "cuda").startswith("needs CUDA")


def test_prompt_completion_split_is_shared_by_trl_and_litgpt():
    from adapters_for_tools.litgpt.config import convert_rows as litgpt_rows
    from adapters_for_tools.trl.config import convert_rows as trl_rows

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (trl,), trl_notes = trl_rows(rows, "messages")
    (lit,), lit_notes = litgpt_rows(rows, "messages")
    assert (trl["prompt"], trl["completion"]) == (lit["instruction"], lit["output"]) == ("<|user|>\nhi\n"
                                                                                         "<|assistant|>\n", "yo\n")
    assert trl_notes == lit_notes == []  # the assistant turn's newline bears loss in the harness's labels too
    trailing = [{"messages": rows[0]["messages"] + [{"role": "user", "content": "ok"}]}]  # text after the turn
    assert "TRL's completion" in trl_rows(trailing, "messages")[1][0]
    assert "LitGPT's output" in litgpt_rows(trailing, "messages")[1][0]
    two_turns = [{"messages": rows[0]["messages"] * 2}]
    with pytest.raises(ValueError, match="2 loss-bearing turns: TRL's prompt/completion form takes exactly one"):
        trl_rows(two_turns, "messages")
    # with the checkpoint's tokenizer TRL gets every row pre-tokenised instead, as the harness tokenises it
    from harness.inputs.data import tokenize_example
    from harness.inputs.models import build_tokenizer  # transformers: heavy

    tok = build_tokenizer(300)
    got, notes = trl_rows(two_turns + rows, "messages", tok, 64)
    assert got == [tokenize_example(tok, r, "messages", 64) for r in two_turns + rows]
    assert "[1, 2] assistant turns: given to TRL pre-tokenised" in notes[0]


def test_unsloth_takes_multi_turn_conversations_pre_tokenised_as_trl_does():
    """Unsloth trains through TRL's SFTTrainer: several assistant turns go to it pre-tokenised, the harness's ids and
    labels (its dataset preparation pads a labels column with DataCollatorForSeq2Seq); one turn stays
    prompt/completion with the BOS text; a packed scenario keeps the clear error (no sample boundary survives
    that collator)."""
    from adapters_for_tools.unsloth.config import trainer_rows
    from harness.inputs.data import tokenize_example
    from harness.inputs.models import build_tokenizer  # transformers: heavy
    from harness.spec.scenario import parse_scenario

    tok = build_tokenizer(300)
    one = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    two = [{"messages": one[0]["messages"] * 2}]
    text = ("version: 1\nname: t\nmodel: {preset: tiny-llama, dtype: float32}\nmethod: {kind: lora}\n"
            "data: {seq_len: 64, prompt_loss: true}\ntrain: {micro_batch: 2, steps: 3}\nhardware: {device: cuda}\n"
            "frameworks: [unsloth]\nmeasure: {baseline: unsloth}\n")
    sc = parse_scenario(text, "s.yaml")
    got, notes = trainer_rows(two + one, "messages", tok, sc)
    assert got == [tokenize_example(tok, r, "messages", 64, prompt_loss=True) for r in two + one]
    assert "[1, 2] assistant turns: given to Unsloth pre-tokenised" in notes["data"]
    (row,), notes = trainer_rows(one, "messages", tok, sc)
    assert row == {"prompt": tok.bos_token + "<|user|>\nhi\n<|assistant|>\n", "completion": "yo\n"}
    assert "BOS" in notes["data"] and "differences" not in notes  # the same labels as the harness's
    packed = parse_scenario(text.replace("prompt_loss: true", "packing: true"), "s.yaml")
    with pytest.raises(ValueError, match="takes exactly one; conversations with several go pre-tokenised.*packing off"):
        trainer_rows(two, "messages", tok, packed)


def test_a_local_checkpoint_has_the_family_of_its_config(tmp_path):
    """A scenario on a local checkpoint (no preset): its config.json's model_type names the family, so a tool that
    lacks it is an unavailable row saying so (validation notes it), as for a preset."""
    import json

    from adapters_for_tools.contract import family_of
    from harness.spec.scenario import parse_scenario

    def sc(model_type: str | None):
        ckpt = tmp_path / str(model_type)
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
        (ckpt / "model.safetensors").write_bytes(b"")  # validation wants weight files; nothing loads them here
        return parse_scenario(f"version: 1\nname: t\nmodel: {{weights: {ckpt}, dtype: float32}}\nmethod: {{kind: lora}}"
                              "\ndata: {seq_len: 32}\ntrain: {micro_batch: 2, steps: 3}\nhardware: {device: cpu}\n"
                              "frameworks: [hf, litgpt]\n", "s.yaml")

    assert family_of(sc("gemma3_text")) == "gemma3" and family_of(sc("qwen2")) == "qwen2"
    assert family_of(sc("brand_new")) == "brand_new" and family_of(sc(None)) is None
    qwen = sc("qwen2_")
    assert any("litgpt: model family 'qwen2_' not supported by litgpt" in n for n in qwen.notes)
