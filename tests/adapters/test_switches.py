"""Speed-switch rows: typed overrides, the switch in each tool's native config, and the read-back verdict.

The read-back runs on a real (tiny) transformers Llama with the patches the tools apply reproduced by hand: Liger's
bound forwards and swapped classes, Unsloth's swapped checkpoint class, LLaMA-Factory's wrapped checkpoint
function, Axolotl's bound LoRA kernels. None of those toolkits is installed here; what is checked is that each
patch, applied the way the tool applies it, is seen, and that its absence marks the run invalid.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import pytest

from adapters_for_tools import registry, switches
from adapters_for_tools.contract import RunContext
from harness.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS_8B = [REPO / "scenarios" / "llama8b_lora.yaml", REPO / "scenarios" / "llama8b_qlora.yaml"]


# -- overrides -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "overrides"), [
    ("hf", {"liger": True}), ("trl", {"liger": True}), ("axolotl", {"liger": True}),
    ("llamafactory", {"liger": True, "unsloth_gc": True}), ("unsloth", {"use_gradient_checkpointing": True}),
    ("unsloth", {"block_compile": False}),
])
def test_override_models_accept_the_switches(name, overrides):
    info = registry.info(name)
    assert info.check_overrides(overrides) == []
    options = info.overrides.model_validate(overrides)
    assert all(getattr(options, k) == v for k, v in overrides.items())


@pytest.mark.parametrize("name", ["hf", "trl", "axolotl", "llamafactory"])
def test_override_models_reject_typos_and_wrong_types(name):
    problems = dict(registry.info(name).check_overrides({"ligr": True}))
    assert problems[("ligr",)].startswith(f"unknown {name} override 'ligr'; did you mean 'liger'?")
    assert "valid boolean" in dict(registry.info(name).check_overrides({"liger": "yes"}))[("liger",)]
    assert registry.info(name).overrides.model_validate({}).liger is False  # the closed-division default


def test_llamafactory_offload_override_typo():
    problems = dict(registry.info("llamafactory").check_overrides({"unsloth_cg": True}))
    assert "did you mean 'unsloth_gc'?" in problems[("unsloth_cg",)]


# -- native configs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora8b():
    return load_scenario(SCENARIOS_8B[0])


def _options(name: str, overrides: dict):
    return registry.info(name).overrides.model_validate(overrides)


def test_hf_training_args_carry_liger(lora8b, tmp_path):
    from adapters_for_tools.hf.config import training_args

    plain = training_args(lora8b, tmp_path, _options("hf", {}))
    assert plain["use_liger_kernel"] is False and plain["gradient_checkpointing"] is True
    assert plain["gradient_checkpointing_kwargs"] == {"use_reentrant": False} and plain["bf16"] is True
    assert plain["per_device_train_batch_size"] == 2 and plain["optim"] == "adamw_torch_fused"
    liger = training_args(lora8b, tmp_path, _options("hf", {"liger": True}))
    assert liger == plain | {"use_liger_kernel": True}
    # the pass-through wins over the typed switch, so the expectation is read from the final arguments
    off = training_args(lora8b, tmp_path, _options("hf", {"liger": True, "training_args": {"use_liger_kernel": False}}))
    assert off["use_liger_kernel"] is False


def test_trl_config_carries_liger(lora8b, tmp_path):
    from adapters_for_tools.trl.config import native_config

    assert native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text")["use_liger_kernel"] is False
    assert native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text", liger=True)["use_liger_kernel"]


def test_unsloth_config_carries_the_checkpoint_mode(lora8b, tmp_path):
    from adapters_for_tools.unsloth.config import checkpoint_mode, native_config

    default = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl")
    assert checkpoint_mode(default) == "unsloth" == default["from_pretrained"]["use_gradient_checkpointing"]
    plain = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl", use_gradient_checkpointing=True)
    assert plain["from_pretrained"]["use_gradient_checkpointing"] is True
    assert plain["get_peft_model"]["use_gradient_checkpointing"] is True and checkpoint_mode(plain) is True
    full = lora8b.model_copy(update={"method": lora8b.method.model_copy(update={"kind": "full"})})
    assert checkpoint_mode(native_config(full, tmp_path, "/ckpt", tmp_path / "d.jsonl")) == "unsloth"


def test_unsloth_checks_its_own_rule_below_512_tokens(lora8b, tmp_path):
    """Under 512-token rows Unsloth turns its offloading mode into plain checkpointing itself: the live model must
    then show True (not the asked "unsloth"), and the run says why; at 512 the asked mode stands."""
    from adapters_for_tools.unsloth.config import checkpoint_mode, checkpoint_note, native_config

    def at(seq, **kw):  # noqa: ANN001, ANN003, ANN202
        sc = lora8b.model_copy(update={"data": lora8b.data.model_copy(update={"seq_len": seq})})
        return native_config(sc, tmp_path, "/ckpt", tmp_path / "d.jsonl", **kw)

    short = at(511)
    assert short["get_peft_model"]["use_gradient_checkpointing"] == "unsloth"  # what Unsloth is asked for
    assert checkpoint_mode(short) is True
    assert "below 512 tokens" in checkpoint_note(short) and "max_seq_length 511" in checkpoint_note(short)
    assert checkpoint_mode(at(512)) == "unsloth" and checkpoint_note(at(512)) is None
    assert checkpoint_mode(at(128, use_gradient_checkpointing=True)) is True
    assert checkpoint_note(at(128, use_gradient_checkpointing=True)) is None
    assert checkpoint_mode(at(128, use_gradient_checkpointing=False)) is False


def test_unsloth_block_compile_row_sets_the_variable_and_expects_it_read_back(lora8b, tmp_path):
    """A row's block_compile goes into the saved config as Unsloth's own variable (a rerun sets it too), set in the
    process before the model loads, and the live model must show it; unset, neither is touched."""
    from adapters_for_tools.unsloth import config as us_config

    assert us_config.row_environment(None) == {}
    assert us_config.row_environment(False) == {"UNSLOTH_BLOCK_COMPILE": "0"}
    assert us_config.row_environment(True) == {"UNSLOTH_BLOCK_COMPILE": "1"}
    cfg = us_config.native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl")
    for block_compile, asked in ((None, {}), (False, {"unsloth_block_compile": False}),
                                 (True, {"unsloth_block_compile": True})):
        ctx = _ctx(tmp_path)
        us_config.expect_switches(ctx, cfg | {"environment": us_config.row_environment(block_compile)})
        assert ctx.extra["switches"] == {"unsloth_gradient_checkpointing": "unsloth", **asked}
    ctx = _ctx(tmp_path)
    us_config.expect_switches(ctx, cfg | {"environment": us_config.row_environment(False)})
    ctx.set_effective(unsloth_gradient_checkpointing="unsloth", unsloth_block_compile=True)
    switches.settle(ctx)
    assert ctx.unsupported == ["switch unsloth_block_compile: asked for False, the live run has True"]


def test_unsloth_block_compile_read_back(llama):
    """Unsloth marks the forward it installs on a decoder-layer class; the read-back finds that class."""
    assert switches.read_unsloth_block_compile(llama) == {"unsloth_block_compile": False,
                                                          "unsloth_block_compiled_classes": []}
    layer_cls = type(llama.get_base_model().model.layers[0])

    class Compiled(layer_cls):  # as Unsloth installs its compiled forward on the class, with its mark
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    Compiled.forward._unsloth_block_compiled = True
    for layer in llama.get_base_model().model.layers:
        layer.__class__ = Compiled
    assert switches.read_unsloth_block_compile(llama) == {"unsloth_block_compile": True,
                                                          "unsloth_block_compiled_classes": ["Compiled"]}


def test_axolotl_config_carries_the_liger_plugin(lora8b, tmp_path):
    from adapters_for_tools.axolotl.config import LIGER_FLAGS, LIGER_PLUGIN, native_config
    from adapters_for_tools.axolotl.config import switches as ax_switches

    plain = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text")
    assert "plugins" not in plain and not any(f in plain for f in LIGER_FLAGS)
    assert not any(k.startswith("lora_") and k.endswith("_kernel") for k in plain)  # Axolotl's default decides
    assert ax_switches(plain) == {"liger_kernel": False}
    liger = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text", liger=True)
    assert liger["plugins"] == [LIGER_PLUGIN] and all(liger[f] is True for f in LIGER_FLAGS)
    assert ax_switches(liger) == {"liger_kernel": True}
    # as Axolotl resolves a LoRA config: its kernels on (what the live model must then show)
    resolved = liger | {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}
    assert ax_switches(resolved) == {"liger_kernel": True, "axolotl_lora_kernels": ["mlp", "o", "qkv"]}
    assert ax_switches(plain | {"lora_mlp_kernel": False})["axolotl_lora_kernels"] == []
    assert ax_switches({"liger_rms_norm": True})["liger_kernel"] is False  # flags without the plugin do nothing


def test_llamafactory_config_carries_liger_and_offloading(lora8b, tmp_path):
    from adapters_for_tools.llamafactory.config import native_config
    from adapters_for_tools.llamafactory.config import switches as lf_switches

    plain = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "lf")
    assert plain["enable_liger_kernel"] is False and plain["use_unsloth_gc"] is False
    assert lf_switches(plain) == {"liger_kernel": False, "gradient_checkpointing_offload": False}
    both = native_config(lora8b, tmp_path, "/ckpt", tmp_path / "lf", liger=True, unsloth_gc=True)
    assert both == plain | {"enable_liger_kernel": True, "use_unsloth_gc": True}
    assert lf_switches(both) == {"liger_kernel": True, "gradient_checkpointing_offload": True}
    # no checkpointing, nothing offloaded whatever use_unsloth_gc says
    assert lf_switches(both | {"disable_gradient_checkpointing": True})["gradient_checkpointing_offload"] is False


def _switch_of_row(fw, sc, tmp_path) -> dict:
    """The switches the native config of one scenario row asks for (what the adapter records as expected)."""
    options = _options(fw.name, fw.overrides)
    if fw.name == "hf":
        from adapters_for_tools.hf.config import training_args

        return {"liger_kernel": training_args(sc, tmp_path, options)["use_liger_kernel"]}
    if fw.name == "trl":
        from adapters_for_tools.trl.config import native_config

        cfg = native_config(sc, tmp_path, "/c", tmp_path / "d", "text", liger=options.liger) | options.sft
        return {"liger_kernel": cfg["use_liger_kernel"]}
    if fw.name == "unsloth":
        from adapters_for_tools.unsloth.config import checkpoint_mode, native_config

        cfg = native_config(sc, tmp_path, "/c", tmp_path / "d", options.use_gradient_checkpointing)
        return {"unsloth_gradient_checkpointing": checkpoint_mode(cfg)}
    if fw.name == "axolotl":
        from adapters_for_tools.axolotl import config as ax

        return ax.switches(ax.native_config(sc, tmp_path, "/c", tmp_path / "d", "text", liger=options.liger)
                           | options.axolotl)
    if fw.name == "llamafactory":
        from adapters_for_tools.llamafactory import config as lf

        cfg = lf.native_config(sc, tmp_path, "/c", tmp_path, liger=options.liger, unsloth_gc=options.unsloth_gc)
        return lf.switches(cfg | options.llamafactory)
    return {}


@pytest.mark.parametrize("path", SCENARIOS_8B, ids=lambda p: p.stem)
def test_8b_scenarios_run_each_peer_beside_its_switch_rows(path, tmp_path):
    sc = load_scenario(path)
    got = {fw.key: _switch_of_row(fw, sc, tmp_path) for fw in sc.frameworks}
    assert got["hf"] == {"liger_kernel": False} and got["hf-liger"] == {"liger_kernel": True}
    assert got["trl"] == {"liger_kernel": False} and got["trl-liger"] == {"liger_kernel": True}
    assert got["unsloth"] == {"unsloth_gradient_checkpointing": "unsloth"}
    assert got["unsloth-plain-ckpt"] == {"unsloth_gradient_checkpointing": True}
    assert got["axolotl"] == {"liger_kernel": False} and got["axolotl-liger"] == {"liger_kernel": True}
    assert got["llamafactory"] == {"liger_kernel": False, "gradient_checkpointing_offload": False}
    assert got["llamafactory-liger"] == {"liger_kernel": True, "gradient_checkpointing_offload": False}
    assert got["llamafactory-offload-ckpt"] == {"liger_kernel": False, "gradient_checkpointing_offload": True}
    # the closed-division rows are the plain adapter names, with no overrides
    for name in ("hf", "trl", "unsloth", "axolotl", "llamafactory"):
        assert next(fw for fw in sc.frameworks if fw.key == name).overrides == {}


# -- read-back on a live (tiny) model ------------------------------------------------------------------------------
@pytest.fixture
def llama():
    """A tiny transformers Llama with PEFT LoRA on every linear layer, as the toolkits train it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))


def _fake_module(name: str, **members) -> types.ModuleType:
    """A module named like a toolkit's, holding functions/classes defined here (``__module__`` set to it)."""
    mod = types.ModuleType(name)
    for key, obj in members.items():
        obj.__module__ = name
        setattr(mod, key, obj)
    return mod


def test_liger_read_back_sees_bound_forwards_and_swapped_classes(llama, monkeypatch):
    import torch

    assert switches.read_liger(llama) == {"liger_kernel": False, "liger_patches": {}}

    class LigerRMSNorm(torch.nn.Module):  # the stand-in of liger_kernel.transformers.rms_norm.LigerRMSNorm
        def forward(self, x):
            return x

    def lce_forward(self, *args, **kwargs):
        return None

    _fake_module("liger_kernel.transformers.rms_norm", LigerRMSNorm=LigerRMSNorm)
    _fake_module("liger_kernel.transformers.model.llama", lce_forward=lce_forward)
    LigerRMSNorm.forward.__module__ = LigerRMSNorm.__module__
    base = llama.get_base_model()
    # Trainer's use_liger_kernel (liger's _patch_rms_norm_module): forward bound on the existing instance
    for layer in base.model.layers:
        layer.input_layernorm.__dict__["forward"] = LigerRMSNorm.forward.__get__(layer.input_layernorm)
    base.__dict__["forward"] = types.MethodType(lce_forward, base)
    got = switches.read_liger(llama)
    assert got == {"liger_kernel": True, "liger_patches": {"LigerRMSNorm": 2, "lce_forward": 1}}
    # Axolotl's plugin / LLaMA-Factory: classes swapped before the model is built
    base.model.norm = LigerRMSNorm()
    assert switches.read_liger(llama)["liger_patches"]["LigerRMSNorm"] == 3
    # RoPE: a module-level function of the architecture's modeling module
    from transformers.models.llama import modeling_llama

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return q, k

    liger_rotary_pos_emb.__module__ = "liger_kernel.transformers.rope"
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    assert switches.read_liger(llama)["liger_patches"]["liger_rotary_pos_emb"] == 1


def test_checkpoint_read_back_tells_plain_from_offloading(llama, monkeypatch):
    import torch
    import torch.utils.checkpoint as ckpt

    assert switches.read_unsloth_checkpointing(llama) == {"gradient_checkpointing_offload": False,
                                                          "unsloth_gradient_checkpointing": False}
    base = llama.get_base_model()
    base.gradient_checkpointing_enable()  # transformers' default: non-reentrant torch checkpoint, on the GPU
    plain = switches.read_unsloth_checkpointing(llama)
    assert plain["unsloth_gradient_checkpointing"] is True and plain["gradient_checkpointing_offload"] is False
    assert plain["checkpoint_function"] == "torch.utils.checkpoint.checkpoint(use_reentrant=False)"

    # Unsloth's "unsloth" mode: torch's reentrant CheckpointFunction swapped for its offloading class, and the
    # layers given torch's checkpoint without use_reentrant (which then runs reentrant)
    offloading = type("UnslothCheckpointFunction", (torch.autograd.Function,), {})
    offloading.__module__ = "unsloth_zoo.gradient_checkpointing"
    monkeypatch.setattr(ckpt, "CheckpointFunction", offloading)
    assert switches.read_unsloth_checkpointing(llama)["unsloth_gradient_checkpointing"] is True  # non-reentrant
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=ckpt.checkpoint)
    got = switches.read_unsloth_checkpointing(llama)
    assert got["unsloth_gradient_checkpointing"] == "unsloth" and got["gradient_checkpointing_offload"] is True
    assert got["checkpoint_function"].endswith("-> unsloth_zoo.gradient_checkpointing.UnslothCheckpointFunction")

    # Unsloth's own drop-in (unsloth_checkpoint) installed through transformers' gradient_checkpointing_enable
    def unsloth_checkpoint(function, *args, **kwargs):
        return function(*args)

    unsloth_checkpoint.__module__ = "unsloth_zoo.gradient_checkpointing"
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(
        unsloth_checkpoint, use_reentrant=False))
    assert switches.read_unsloth_checkpointing(llama)["unsloth_gradient_checkpointing"] == "unsloth"

    # checkpointing switched off on every layer: False, whatever function stays installed
    for mod in base.modules():
        if hasattr(mod, "gradient_checkpointing"):
            mod.gradient_checkpointing = False
    assert switches.read_unsloth_checkpointing(llama)["unsloth_gradient_checkpointing"] is False


def test_checkpoint_read_back_sees_llamafactory_wrappers(llama):
    """LLaMA-Factory wraps the checkpoint function with functools.wraps (keeping ``__self__``); with
    use_unsloth_gc the wrapped one is its own offloading autograd Function's ``apply``."""
    import torch
    import torch.utils.checkpoint as ckpt

    def custom(fn):  # as llamafactory.model.model_utils.checkpointing.get_custom_gradient_checkpointing_func
        @functools.wraps(fn, assigned=(*functools.WRAPPER_ASSIGNMENTS, "__self__"))
        def custom_gradient_checkpointing_func(func, *args, **kwargs):
            return fn(func, *args, **kwargs)

        return custom_gradient_checkpointing_func

    base = llama.get_base_model()
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=custom(
        functools.partial(ckpt.checkpoint, use_reentrant=False)))
    got = switches.read_checkpointing(llama)
    assert got["gradient_checkpointing_offload"] is False and "use_reentrant=False" in got["checkpoint_function"]

    offloading = type("UnslothGradientCheckpointing", (torch.autograd.Function,), {})
    offloading.__qualname__ = "get_unsloth_gradient_checkpointing_func.<locals>.UnslothGradientCheckpointing"
    offloading.__module__ = "llamafactory.model.model_utils.checkpointing"
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=custom(offloading.apply))
    got = switches.read_checkpointing(llama)
    assert got["gradient_checkpointing_offload"] is True
    assert "UnslothGradientCheckpointing" in got["checkpoint_function"]


def test_axolotl_lora_kernel_read_back(llama):
    def apply_lora_qkv(self, hidden_states):
        return hidden_states

    def apply_lora_mlp_swiglu(self, x):
        return x

    def original_apply_o(self, hidden_states):  # Axolotl's fallback: no kernel
        return hidden_states

    _fake_module("axolotl.kernels.lora", apply_lora_qkv=apply_lora_qkv, apply_lora_mlp_swiglu=apply_lora_mlp_swiglu)
    _fake_module("axolotl.monkeypatch.lora_kernels", original_apply_o=original_apply_o)
    assert switches.read_axolotl_lora_kernels(llama)["axolotl_lora_kernels"] == []
    for layer in llama.get_base_model().model.layers:
        layer.self_attn.apply_qkv = types.MethodType(apply_lora_qkv, layer.self_attn)
        layer.self_attn.apply_o = types.MethodType(original_apply_o, layer.self_attn)
        layer.mlp.forward = types.MethodType(apply_lora_mlp_swiglu, layer.mlp)
    got = switches.read_axolotl_lora_kernels(llama)
    assert got == {"axolotl_lora_kernels": ["mlp", "qkv"], "axolotl_lora_kernel_modules": {"mlp": 2, "qkv": 2},
                   "axolotl_lora_kernel_places": ["mlp", "o", "qkv"]}


def test_axolotl_kernels_with_nothing_to_fuse_are_the_tools_rule_not_a_failed_switch(tmp_path):
    """A mixture-of-experts model under all-linear LoRA: its experts are no nn.Linear, so no module has LoRA on
    gate/up/down and Axolotl's MLP kernel, on by its default, attaches nowhere. The run then expects qkv and o only
    and says why; a kernel that had a place and did not attach still makes it invalid."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=2,
                         num_experts_per_tok=1, head_dim=8)
    moe = get_peft_model(Qwen3MoeForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    assert switches.read_axolotl_lora_kernels(moe)["axolotl_lora_kernel_places"] == ["o", "qkv"]
    ctx = _ctx(tmp_path)
    switches.expect(ctx, axolotl_lora_kernels=["mlp", "o", "qkv"])
    ctx.set_effective(axolotl_lora_kernels=["o", "qkv"], axolotl_lora_kernel_places=["o", "qkv"])
    switches.narrow_axolotl_kernels(ctx)
    switches.settle(ctx)
    assert ctx.unsupported == [] and ctx.extra["switches"]["axolotl_lora_kernels"] == ["o", "qkv"]
    assert "lora_mlp_kernel on, with nothing to fuse" in ctx.extra["tool_rule"]

    ctx = _ctx(tmp_path)  # a dense model: the MLP kernel had its place and did not attach
    switches.expect(ctx, axolotl_lora_kernels=["mlp", "o", "qkv"])
    ctx.set_effective(axolotl_lora_kernels=["o", "qkv"], axolotl_lora_kernel_places=["mlp", "o", "qkv"])
    switches.narrow_axolotl_kernels(ctx)
    switches.settle(ctx)
    assert ctx.unsupported == ["switch axolotl_lora_kernels: asked for ['mlp', 'o', 'qkv'], the live run has "
                               "['o', 'qkv']"] and "tool_rule" not in ctx.extra


# -- the verdict -----------------------------------------------------------------------------------------------------
def _ctx(tmp_path) -> RunContext:
    return RunContext(scenario=None, framework="hf", overrides={"liger": True}, repeat=0, checkpoint="",
                      dataset_path=tmp_path, work_dir=tmp_path, output_dir=tmp_path / "output", device="cpu",
                      meter=None)


def test_a_switch_that_did_not_take_effect_marks_the_run_invalid(tmp_path, llama):
    ctx = _ctx(tmp_path)
    switches.expect(ctx, liger_kernel=True)
    assert ctx.extra["switches"] == {"liger_kernel": True}
    cb = switches.read_back_callback(ctx, switches.read_trainer_model)
    cb.on_step_begin(None, None, None, model=llama)  # the first step: read
    assert ctx.effective["liger_kernel"] is False and ctx.effective["gradient_checkpointing_offload"] is False
    ctx.effective["liger_kernel"] = "sentinel"
    cb.on_step_begin(None, None, None, model=llama)  # later steps: nothing read again
    assert ctx.effective["liger_kernel"] == "sentinel"
    ctx.effective["liger_kernel"] = False
    switches.settle(ctx)
    assert ctx.unsupported == ["switch liger_kernel: asked for True, the live run has False"]


def test_switches_as_asked_leave_the_run_valid_and_unread_ones_do_not(tmp_path):
    ctx = _ctx(tmp_path)
    switches.expect(ctx, unsloth_gradient_checkpointing="unsloth", liger_kernel=False)
    ctx.set_effective(unsloth_gradient_checkpointing="unsloth", liger_kernel=False)
    switches.settle(ctx)
    assert ctx.unsupported == []
    key = "unsloth_gradient_checkpointing"
    assert switches.mismatches({key: "unsloth"}, {key: True}) == [(key, "asked for 'unsloth', the live run has True")]
    assert switches.mismatches({"liger_kernel": True}, {}) == [
        ("liger_kernel", "asked for True, not read back from the live run")]


def test_missing_liger_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(switches.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"unavailable: liger-kernel not installed in the hf environment.*"
                                           r"env create base.*liger-kernel==0\.8\.5"):
        switches.require_liger("hf")


@pytest.mark.parametrize("scenario", ["llama8b_lora_frontier.yaml", "llama8b_qlora_frontier.yaml"])
def test_the_frontiers_peer_offload_rows_carry_their_settings_into_each_tools_config(scenario, tmp_path):
    """hf, TRL and Axolotl each have a row at their documented long-context setting (Liger plus host offload of
    activations), beside Unsloth's and LLaMA-Factory's offloading rows: the settings reach each tool's config as the
    adapters build it (the typed switch, then the row's pass-through)."""
    from adapters_for_tools.axolotl.config import native_config as axolotl_config
    from adapters_for_tools.axolotl.config import switches as axolotl_switches
    from adapters_for_tools.hf.config import switches as hf_switches
    from adapters_for_tools.hf.config import training_args
    from adapters_for_tools.trl.config import native_config as trl_config
    from adapters_for_tools.trl.config import switches as trl_switches

    sc = load_scenario(REPO / "scenarios" / scenario)
    rows = {f.label: f for f in sc.frameworks}
    hf = rows["hf-liger-offload-ckpt"]
    args = training_args(sc, tmp_path, _options(hf.name, hf.overrides))
    assert args["use_liger_kernel"] is True and args["gradient_checkpointing"] is True
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": False, "offload": True}
    # each offload is then expected back from the live run, like the Liger switch; the plain rows expect none
    assert hf_switches(args) == {switches.LIGER: True, switches.OFFLOAD: True}
    plain = rows["hf-liger"]
    assert hf_switches(training_args(sc, tmp_path, _options(plain.name, plain.overrides))) == {switches.LIGER: True}
    trl = rows["trl-liger-offload"]
    options = _options(trl.name, trl.overrides)
    cfg = trl_config(sc, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text", liger=options.liger) | options.sft
    assert cfg["use_liger_kernel"] is True and cfg["activation_offloading"] is True
    assert trl_switches(cfg) == {switches.LIGER: True, switches.ACT_OFFLOAD: True}
    assert trl_switches(trl_config(sc, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text")) == {switches.LIGER: False}
    ax = rows["axolotl-liger-offload"]
    options = _options(ax.name, ax.overrides)
    cfg = axolotl_config(sc, tmp_path, "/ckpt", tmp_path / "d.jsonl", "text", liger=options.liger) | options.axolotl
    assert cfg["activation_offloading"] is True and cfg["gradient_checkpointing"]
    assert "axolotl.integrations.liger.LigerPlugin" in cfg["plugins"]
    assert axolotl_switches(cfg) == {switches.LIGER: True, switches.ACT_OFFLOAD: True}
    assert switches.ACT_OFFLOAD not in axolotl_switches(axolotl_config(sc, tmp_path, "/ckpt", tmp_path / "d.jsonl",
                                                                       "text"))
    # Axolotl's hidden_states mode offloads inside the checkpoint, not in the step's context: nothing to read there
    assert switches.ACT_OFFLOAD not in axolotl_switches(cfg | {"activation_offloading": "hidden_states"})


def test_activation_offloading_is_read_from_the_trainer_after_its_steps():
    """TRL's and Axolotl's offloading: the trainer keeps an ``OffloadActivations`` (saved-tensor hooks) and enters it
    around each step. Built but never entered reads as off; a step inside it as on, with its tensor count; a
    trainer with a null context, or none, as off."""
    import contextlib

    import torch

    class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):  # TRL's counter, its packing left out
        def __init__(self) -> None:
            self.tensor_id = 0

            def pack(t):
                self.tensor_id += 1
                return t

            super().__init__(pack, lambda t: t)

        def __enter__(self):
            self.tensor_id = 0
            return super().__enter__()

    trainer = types.SimpleNamespace(maybe_activation_offload_context=OffloadActivations())
    assert switches.read_activation_offloading(trainer)[switches.ACT_OFFLOAD] is False
    x = torch.randn(4, 4, requires_grad=True)
    with trainer.maybe_activation_offload_context:
        (x.sin() * x).sum().backward()
    eff = switches.read_activation_offloading(trainer)
    assert eff[switches.ACT_OFFLOAD] is True and eff["activation_offload_tensors"] >= 2
    assert eff["activation_offload_context"].endswith("OffloadActivations")
    axolotl = types.SimpleNamespace(activation_offload_context=contextlib.nullcontext())
    assert switches.read_activation_offloading(axolotl) == {
        switches.ACT_OFFLOAD: False, "activation_offload_context": "contextlib.nullcontext",
        "activation_offload_tensors": None}
    assert switches.read_activation_offloading(types.SimpleNamespace()) == {switches.ACT_OFFLOAD: False}
