"""Model families: every preset is its published architecture, every tiny one trains in transformers as its own
class, "all-linear" is what PEFT adapts, the FLOP count is right per family, and the speed scenarios beside Llama
keep the Llama ones' rows."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from adapters_for_tools import registry
from harness.common.paths import REPO_ROOT
from harness.inputs import models
from harness.measuring import flops
from harness.measuring.effective import read_back_model
from harness.spec.scenario import load_scenario

# Parameter totals from the model cards / the published checkpoints (embeddings included), to within 0.5 %
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "llama-3.2-1b": 1.24e9, "llama-2-7b": 6.74e9, "mistral-7b": 7.25e9,
    "mixtral-8x7b": 46.7e9, "gemma-2-9b": 9.24e9, "gemma-2-2b": 2.61e9, "gemma-3-1b": 1.00e9,
    "phi-3-mini-4k": 3.82e9, "qwen2.5-7b": 7.62e9, "qwen2.5-0.5b": 0.494e9, "qwen3-8b": 8.19e9,
    "qwen3-30b-a3b": 30.5e9, "deepseek-v2-lite": 15.7e9, "falcon-7b": 6.92e9, "pythia-6.9b": 6.86e9,
}
SPEED_SCENARIOS = ["qwen2.5_7b", "mistral7b", "gemma2_9b"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    return tmp_path


def _meta_model(preset: models.Preset):
    """The preset's exact architecture with no storage behind it (shapes only)."""
    config = AutoConfig.for_model(**models.model_config_dict(preset, "bfloat16"))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linear_params(model, config) -> int:  # noqa: ANN001
    """Parameters a token passes through in matrix products, counted from the live modules: every nn.Linear (the
    LM head too, tied or not), MoE routers, and the routed share (top-k of E) of the 3-D expert tensors."""
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = sum(linear.values())
    experts = getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", None)
    for name, p in model.named_parameters():
        if id(p) in linear:
            continue
        if ".experts." in name and p.ndim == 3:
            total += p.numel() * config.num_experts_per_tok // experts
        elif name.endswith("mlp.gate.weight"):  # the router: a bare weight in transformers 5
            total += p.numel()
    return total


def test_every_family_has_a_tiny_and_a_real_preset_in_transformers():
    real = {p.family for p in models.presets().values() if not p.tiny_of}
    tiny = {p.family for p in models.tiny_presets()}
    assert real == tiny == set(models.FAMILIES)
    for p in models.presets().values():
        assert p.config["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, p.name
        if p.tiny_of:
            assert models.get_preset(p.tiny_of).family == p.family
            assert p.config["vocab_size"] == 320  # the byte tokenizer's 260 tokens plus reserved ones


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_real_presets_match_published_sizes(name):
    p = models.get_preset(name)
    n = sum(x.numel() for x in _meta_model(p).parameters())
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.005, f"{name}: {n / 1e9:.3f}B"


@pytest.mark.parametrize("name", [p.name for p in models.tiny_presets()])
def test_tiny_checkpoint_loads_as_its_own_architecture_and_trains(cache, name):
    p = models.get_preset(name)
    d = models.prepare_random_checkpoint(p, "float32", seed=0)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[p.config["model_type"]]
    assert model.config.vocab_size == 320
    if p.config.get("tie_word_embeddings"):  # one tensor: the input embedding is the LM head
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 320
    assert tok("hi")["input_ids"] == [256, *b"hi"]
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))  # longer than the 32 windows
    out = model(input_ids=ids, labels=ids)
    assert 5.0 < out.loss.item() < 6.5  # a random model: about ln(320) = 5.77
    out.loss.backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() > 0 for g in grads.values()) >= 0.8 * len(grads)  # MoE: unrouted experts idle


@pytest.mark.parametrize("name", [p.name for p in models.tiny_presets()])
def test_all_linear_is_what_peft_adapts(cache, name):
    p = models.get_preset(name)
    model = AutoModelForCausalLM.from_pretrained(models.prepare_random_checkpoint(p, "float32", seed=0))
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    if models.FAMILIES[p.family].moe:
        assert set(p.linear_modules) <= leaves  # the attention projections; the experts are no linear modules
    else:
        assert set(p.linear_modules) == leaves
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(p.linear_modules)))
    assert read_back_model(peft_model)["target_modules"] == sorted(p.linear_modules)


def test_all_linear_resolves_per_family_in_scenarios(tmp_path):
    base = yaml.safe_load((REPO_ROOT / "scenarios" / "tiny_cpu.yaml").read_text())
    for preset, want in [("tiny-phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                         ("tiny-falcon", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
                         ("tiny-mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                         ("tiny-llama", list(models.LLAMA_LINEAR))]:
        d = base | {"model": base["model"] | {"preset": preset}, "frameworks": ["hf"]}
        path = tmp_path / f"{preset}.yaml"
        path.write_text(yaml.safe_dump(d))
        assert load_scenario(path).method.resolved_targets() == want


@pytest.mark.parametrize("name", sorted(p for p in models.presets()))
def test_matmul_params_count_the_modules_a_token_passes(name):
    p = models.get_preset(name)
    model = _meta_model(p)
    assert flops.matmul_params(p.config) == _linear_params(model, model.config)
    # the config.json transformers writes (rope_parameters, num_local_experts, layer_types) counts the same
    assert flops.matmul_params(model.config.to_dict()) == flops.matmul_params(p.config)


def test_moe_counts_active_experts_only():
    c = models.get_preset("mixtral-8x7b").config
    h, inter, layers = 4096, 14336, 32
    attention = h * h * 2 + 2 * h * 1024  # q, o 4096x4096; k, v 4096x1024
    moe = 2 * 3 * h * inter + h * 8  # two of eight experts (gate, up, down each), and the router
    assert flops.matmul_params(c) == layers * (attention + moe) + h * 32000  # 12.75e9 of 46.7e9
    q = models.get_preset("qwen3-30b-a3b").config
    assert 3.0e9 < flops.matmul_params(q) < 3.1e9  # "A3B": 3.3B active with the 0.31B embedding
    ds = models.get_preset("deepseek-v2-lite").config
    # first layer dense; then 6 routed + 2 shared experts of 1408 and a 64-way router per layer
    dense, moe = 3 * 2048 * 10944, 8 * 3 * 2048 * 1408 + 2048 * 64
    mla = 2048 * 16 * 192 + 2048 * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * 2048
    assert flops.matmul_params(ds) == 27 * mla + dense + 26 * moe + 2048 * 102400


def test_attention_flops_per_family():
    # DeepSeek's latent attention: queries and keys of 192 per head, values of 128
    ds = models.get_preset("deepseek-v2-lite").config
    assert flops.attention_flops(ds, 2048**2) == 27 * 3 * 16 * (192 + 128) * 2048**2
    # Falcon-7B: 71 heads of 64
    fa = models.get_preset("falcon-7b").config
    assert flops.attention_flops(fa, 100) == 32 * 6 * 4544 * 100


def test_sliding_windows_cap_attention_flops():
    c = models.get_preset("tiny-gemma2").config  # two layers: a 32-token window, then global
    assert flops.layer_windows(c) == [32, None]
    d_attn = 4 * 16
    per_sq = 6 * d_attn  # 3 x (d_qk + d_v)
    # two samples of 64: the local layer saves (64 - 32)^2 per sample
    sq, n = 2 * 64**2, 2
    assert flops.attention_flops(c, sq, n, 64) == per_sq * sq + per_sq * (sq - n * 32**2)
    # samples within the window: nothing to save; no sample count: windows not applied
    assert flops.attention_flops(c, 2 * 30**2, 2, 30) == 2 * per_sq * 2 * 30**2
    assert flops.attention_flops(c, sq) == 2 * per_sq * sq
    g3 = models.get_preset("gemma-3-1b").config  # one global layer in six
    assert [w is None for w in flops.layer_windows(g3)].count(True) == 4
    assert flops.layer_windows(models.get_preset("phi-3-mini-4k").config) == [2047] * 32
    assert flops.layer_windows(models.get_preset("qwen2.5-7b").config) == [None] * 28


def test_mfu_applies_windows_per_step():
    c = models.get_preset("tiny-gemma2").config
    steps = [{"measured": True, "step_s": 1.0, "tokens": 128, "ctx_tokens_sq": 2 * 64**2, "samples": 2,
              "max_sample_len": 64}]
    _, tflops = flops.mfu(c, "lora", steps, None)
    assert math.isclose(tflops * 1e12, flops.train_flops(c, "lora", 128, 2 * 64**2, 2, 64))
    assert tflops * 1e12 < flops.train_flops(c, "lora", 128, 2 * 64**2)  # the window saved some


# rows a family's speed scenarios add to Llama's: a tool's own switch around its failure on that family (Unsloth's
# compiled Gemma-2 block fails in Inductor)
FAMILY_ROWS = {"gemma2": {"unsloth-no-compile": {"block_compile": False}}}


@pytest.mark.parametrize("model", SPEED_SCENARIOS)
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_speed_scenarios_keep_the_llama_rows(model, kind):
    sc = load_scenario(REPO_ROOT / "scenarios" / f"{model}_{kind}.yaml")
    llama = load_scenario(REPO_ROOT / "scenarios" / f"llama8b_{kind}.yaml")
    preset = models.get_preset(sc.model.preset)
    extra = FAMILY_ROWS.get(preset.family, {})
    assert {f.key: f.overrides for f in sc.frameworks if f.key in extra} == extra
    rows = [f for f in sc.frameworks if f.key not in extra]
    # every row of the Llama scenario whose framework can run this family, with the same switches; a framework
    # that cannot may keep its plain row (stored saying why), never its variants
    listed = {f.key for f in rows}
    expected = [f for f in llama.frameworks
                if preset.family in registry.info(f.name).families or (f.key == f.name and f.key in listed)]
    assert [f.key for f in rows] == [f.key for f in expected]
    for ours, theirs in zip(rows, expected, strict=True):
        if "offload_weights" in theirs.overrides:  # half the layers streamed, as in Llama's row (16 of 32)
            layers = preset.config["num_hidden_layers"]
            assert ours.overrides == theirs.overrides | {"offload_weights": layers // 2}
        else:
            assert ours.overrides == theirs.overrides
    for section in ("method", "data", "train", "hardware", "measure"):
        assert getattr(sc, section).model_dump() == getattr(llama, section).model_dump(), section
    assert sc.model.model_dump(exclude={"preset", "attn_implementation"}) == \
        llama.model.model_dump(exclude={"preset", "attn_implementation"})
    # Gemma-2 in eager attention: SDPA would drop its attention soft-capping
    assert sc.model.attn_implementation == ("eager" if preset.family == "gemma2" else "sdpa")

