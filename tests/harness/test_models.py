"""Generated checkpoints: byte-level tokenizer, exact architecture, cached once."""

from __future__ import annotations

import json

import pytest

from harness.inputs import models


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    return tmp_path


def test_tokenizer_one_token_per_byte_with_bos():
    tok = models.build_tokenizer(320)
    assert len(tok) == 320
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(b"hello world")
    assert tok.decode(ids[1:]) == "hello world"
    assert (tok.eos_token_id, tok.pad_token_id) == (257, 258)


def test_tokenizer_vocab_matches_8b():
    assert len(models.build_tokenizer(128256)) == 128256


def test_presets_have_known_shapes():
    p = models.get_preset("llama-3.1-8b")
    c = p.config
    assert (c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["intermediate_size"], c["rope_theta"]) == (128256, 4096, 32, 32, 8, 14336,
                                                                                   500000.0)
    with pytest.raises(KeyError, match="did you mean 'llama-3.1-8b'"):
        models.get_preset("llama-3.1-8")


def test_random_checkpoint_built_once_and_loadable(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = models.get_preset("tiny-qwen2")
    d = models.prepare_random_checkpoint(p, "float32", seed=3)
    mtime = (d / "model.safetensors").stat().st_mtime
    assert models.prepare_random_checkpoint(p, "float32", seed=3) == d
    assert (d / "model.safetensors").stat().st_mtime == mtime  # cached, not rebuilt
    m = AutoModelForCausalLM.from_pretrained(d)
    assert m.config.model_type == "qwen2" and m.config.vocab_size == 320
    assert len(AutoTokenizer.from_pretrained(d)) == 320
    assert json.loads((d / "tunebench.json").read_text())["seed"] == 3
    # a different seed is a different checkpoint with different weights
    d2 = models.prepare_random_checkpoint(p, "float32", seed=4)
    m2 = AutoModelForCausalLM.from_pretrained(d2)
    assert d2 != d
    assert not m.model.layers[0].mlp.up_proj.weight.equal(m2.model.layers[0].mlp.up_proj.weight)
    assert not list(cache.glob("models/*.tmp-*"))  # no half-written directory left
