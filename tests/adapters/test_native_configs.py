"""Native configs the toolkit adapters generate, checked without the toolkits installed (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.spec.scenario import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]

LLAMA8B_QLORA = """
version: 1
name: llama8b_qlora_test
model: {preset: llama-3.1-8b, weights: random, dtype: bfloat16}
method: {kind: qlora, lora_r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}
data: {source: synthetic, seq_len: 2048, packing: true}
train: {micro_batch: 2, grad_accum: 4, steps: 20, warmup_steps: 5, lr: 2.0e-4, optimizer: adamw_8bit,
        gradient_checkpointing: true, seed: 7}
hardware: {device: cuda}
frameworks: [hf, trl, unsloth, axolotl, llamafactory]
"""


@pytest.fixture(scope="module")
def tiny():
    return load_scenario(REPO / "scenarios" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def big():
    return parse_scenario(LLAMA8B_QLORA, "llama8b.yaml")


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_trl_tiny(tiny, tmp_path):
    from adapters_for_tools.trl.config import native_config

    cfg = native_config(tiny, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text")
    assert cfg["model_name_or_path"] == "/ckpt"
    assert cfg["datasets"] == [{"path": "json", "data_files": str(tmp_path / "d.jsonl"), "split": "train"}]
    assert (cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"], cfg["max_steps"]) == (4, 2, 12)
    assert cfg["learning_rate"] == 1e-3 and cfg["lr_scheduler_type"] == "constant" and cfg["warmup_steps"] == 0
    assert cfg["optim"] == "adamw_torch" and cfg["max_length"] == 128 and cfg["packing"] is False
    assert cfg["train_sampling_strategy"] == "sequential" and cfg["shuffle_dataset"] is False
    assert cfg["gradient_checkpointing"] is True and cfg["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert cfg["bf16"] is False and cfg["fp16"] is False and cfg["use_cpu"] is True
    assert cfg["use_peft"] and cfg["lora_r"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.0
    assert cfg["lora_target_modules"] == ALL_LINEAR and cfg["use_dora"] is False
    assert "load_in_4bit" not in cfg and "completion_only_loss" not in cfg
    assert cfg["seed"] == 42 and cfg["dataset_num_proc"] == 1


def test_trl_llama8b_qlora(big, tmp_path):
    from adapters_for_tools.trl.config import cannot_honour, native_config

    cfg = native_config(big, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text")
    assert cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4" and cfg["use_bnb_nested_quant"]
    assert cfg["bf16"] and cfg["dtype"] == "bfloat16" and cfg["optim"] == "adamw_bnb_8bit"
    assert cfg["packing"] and cfg["packing_strategy"] == "bfd" and cfg["max_length"] == 2048
    assert cfg["use_cpu"] is False and cfg["lora_alpha"] == 32
    assert cannot_honour(big) == []


def test_trl_alpaca_rows_render_like_the_harness():
    from adapters_for_tools.trl.config import convert_rows
    from harness.inputs.data import ALPACA_PROMPT

    rows, notes = convert_rows([{"instruction": "add", "input": "1 2", "output": "3"}], "alpaca")
    assert rows == [{"prompt": ALPACA_PROMPT.format(instruction="add", input="1 2"), "completion": "3"}]
    assert notes == []
    rows, notes = convert_rows([{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}], "messages")
    assert rows == [{"prompt": "<|user|>\nhi\n<|assistant|>\n", "completion": "yo\n"}]
    assert notes == []  # the assistant turn's newline bears loss in the harness's labels as in TRL's completion


def test_axolotl_tiny_and_big(tiny, big, tmp_path):
    from adapters_for_tools.axolotl.config import native_config

    cfg = native_config(tiny, tmp_path, "/ckpt", tmp_path / "dataset.jsonl", "text")
    assert cfg["base_model"] == "/ckpt" and cfg["tokenizer_type"] == "AutoTokenizer"
    assert cfg["datasets"] == [{"path": str(tmp_path / "dataset.jsonl"), "ds_type": "json", "type": "completion",
                                "field": "text"}]
    assert cfg["sequence_len"] == 128 and cfg["sample_packing"] is False and cfg["val_set_size"] == 0.0
    assert cfg["micro_batch_size"] == 4 and cfg["gradient_accumulation_steps"] == 2 and cfg["max_steps"] == 12
    assert cfg["lr_scheduler"] == "constant" and cfg["optimizer"] == "adamw_torch"
    assert cfg["shuffle_merged_datasets"] is False and cfg["curriculum_sampling"] is True
    assert cfg["adapter"] == "lora" and cfg["lora_r"] == 8 and cfg["lora_target_modules"] == ALL_LINEAR
    assert cfg["peft_use_dora"] is False and "load_in_4bit" not in cfg
    assert cfg["output_dir"] == str(tmp_path / "output") and cfg["save_strategy"] == "no"
    assert cfg["dataset_prepared_path"].startswith(str(tmp_path))
    assert cfg["gradient_checkpointing"] and cfg["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert cfg["special_tokens"]["eos_token"] == "<|end_of_text|>"
    big_cfg = native_config(big, tmp_path, "/ckpt", tmp_path / "dataset.jsonl", "text")
    assert big_cfg["adapter"] == "qlora" and big_cfg["load_in_4bit"] and big_cfg["sample_packing"]
    assert big_cfg["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                            "bnb_4bit_compute_dtype": "bfloat16"}
    assert big_cfg["bf16"] and big_cfg["optimizer"] == "adamw_bnb_8bit" and big_cfg["seed"] == 7
    # conversations: the pre-tokenised file the adapter writes (config.tokenised_rows), no type
    assert native_config(big, tmp_path, "/ckpt", tmp_path / "t.jsonl", "messages")["datasets"] == [
        {"path": str(tmp_path / "t.jsonl"), "ds_type": "json"}]


def test_axolotl_alpaca_uses_the_harness_template(tiny, tmp_path):
    from adapters_for_tools.axolotl.config import native_config
    from harness.inputs.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    ds = native_config(tiny, tmp_path, "/ckpt", tmp_path / "d.jsonl", "alpaca")["datasets"][0]
    assert ds["type"]["format"] == ALPACA_PROMPT and ds["type"]["no_input_format"] == ALPACA_PROMPT_NO_INPUT


def test_llamafactory_tiny_and_big(tiny, big, tmp_path):
    from adapters_for_tools.llamafactory.config import cannot_honour, native_config
    from adapters_for_tools.llamafactory.dataset import DATASET_NAME, dataset_info

    cfg = native_config(tiny, tmp_path, "/ckpt", tmp_path / "lf_data")
    assert cfg["stage"] == "pt" and cfg["finetuning_type"] == "lora" and cfg["dataset"] == DATASET_NAME
    assert cfg["dataset_dir"] == str(tmp_path / "lf_data") and cfg["cutoff_len"] == 128 and cfg["packing"] is False
    assert cfg["lora_rank"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_target"] == ",".join(ALL_LINEAR)
    assert cfg["per_device_train_batch_size"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["max_steps"] == 12 and cfg["lr_scheduler_type"] == "constant" and cfg["disable_shuffling"] is True
    assert cfg["disable_gradient_checkpointing"] is False and cfg["use_reentrant_gc"] is False
    assert cfg["use_unsloth"] is False and cfg["enable_liger_kernel"] is False and cfg["report_to"] == "none"
    assert cfg["flash_attn"] == "sdpa" and cfg["preprocessing_num_workers"] == 1
    assert "quantization_bit" not in cfg
    assert dataset_info("data.jsonl") == {DATASET_NAME: {"file_name": "data.jsonl", "formatting": "alpaca",
                                                         "columns": {"prompt": "text"}}}
    big_cfg = native_config(big, tmp_path, "/ckpt", tmp_path / "lf_data")
    assert big_cfg["quantization_bit"] == 4 and big_cfg["quantization_type"] == "nf4"
    assert big_cfg["double_quantization"] is True and big_cfg["bf16"] and big_cfg["packing"] is True
    assert [s for s, _ in cannot_honour(big, "text")] == ["data.packing"]
    assert cannot_honour(tiny, "alpaca") == []  # instruction rows train in the sft stage


def test_unsloth_big(big, tiny, tmp_path):
    from adapters_for_tools.unsloth.config import cannot_honour, native_config

    cfg = native_config(big, tmp_path, "/ckpt", tmp_path / "d.jsonl")
    fp, peft, sft = cfg["from_pretrained"], cfg["get_peft_model"], cfg["sft"]
    assert fp["model_name"] == "/ckpt" and fp["max_seq_length"] == 2048 and fp["load_in_4bit"] is True
    assert fp["dtype"] == "bfloat16" and fp["full_finetuning"] is False
    assert peft["r"] == 16 and peft["lora_alpha"] == 32 and peft["bias"] == "none"
    assert peft["target_modules"] == ALL_LINEAR and peft["use_gradient_checkpointing"] == "unsloth"
    assert sft["optim"] == "adamw_bnb_8bit" and sft["packing"] and sft["train_sampling_strategy"] == "sequential"
    assert cannot_honour(big) == []
    assert native_config(tiny, tmp_path, "/ckpt", tmp_path / "d.jsonl")["from_pretrained"]["load_in_4bit"] is False


def test_unsloth_gets_the_bos_written_into_its_text():
    """Unsloth adds no special tokens to text lacking the BOS text; with it written in, the token ids are ours."""
    from adapters_for_tools.unsloth.config import with_bos
    from harness.inputs.models import build_tokenizer

    tok = build_tokenizer(512)
    rows = [{"text": "ab cd"}, {"text": "efg"}]
    fixed, changed = with_bos(rows, tok.bos_token)
    assert changed and [r["text"] for r in fixed] == [tok.bos_token + "ab cd", tok.bos_token + "efg"]
    for raw, r in zip(rows, fixed, strict=True):
        assert tok(r["text"], add_special_tokens=False)["input_ids"] == tok(raw["text"])["input_ids"]
    assert with_bos(fixed, tok.bos_token) == (fixed, False)
    pc, changed = with_bos([{"prompt": "q", "completion": "a"}], tok.bos_token)
    assert changed and pc == [{"prompt": tok.bos_token + "q", "completion": "a"}]


def test_capabilities_declared():
    from adapters_for_tools import registry

    assert {"trl", "unsloth", "axolotl", "llamafactory"} <= set(registry.names())
    assert registry.info("unsloth").devices == {"cuda"} and "dora" not in registry.info("unsloth").methods
    assert registry.info("axolotl").devices == {"cuda"} and registry.info("llamafactory").devices == {"cuda"}
    assert registry.info("trl").devices == {"cpu", "cuda"} and registry.info("trl").env == "trl"
