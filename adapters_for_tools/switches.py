"""Speed switches: a tool's documented fastest or leanest settings, asked for by a row and read back from the live run.

Beside its closed-division row, each tool runs its own speed and memory switches as labelled rows (Liger-Kernel in
the hf, TRL, Axolotl and LLaMA-Factory rows; Unsloth's plain or offloading checkpoint mode and its per-layer
compile; LLaMA-Factory's offloading checkpoints). A flag a tool silently ignores would make such a row measure the
default under another name, so every switch is checked where it matters, on the live model:

1. The adapter writes the switch into the tool's native config and records what that config asks for:
   :func:`expect` (``extra["switches"]``, the row's variant for the report).
2. At the first optimizer step, before the step's clock starts, :func:`read_back_callback` reads the same keys
   from the live model (:func:`read_liger`, :func:`read_checkpointing`, :func:`read_unsloth_checkpointing`,
   :func:`read_unsloth_block_compile`, :func:`read_axolotl_lora_kernels`) into ``ctx.effective``; what lives on
   the trainer rather than the model is read from it after training (:func:`read_activation_offloading`).
3. After training, :func:`settle` reports each difference with ``ctx.cannot_honour``: the run is marked invalid.

Keys (in ``effective``; those a row asks for also in ``extra["switches"]``):

==============================  ====================================================================================
liger_kernel                    bool: Liger-Kernel replacements found on the live model
liger_patches                   what Liger replaced and how often (``{"LigerRMSNorm": 65, "lce_forward": 1, ...}``)
checkpoint_function             what the checkpointed layers call, wrappers unwrapped (``torch.utils.checkpoint.
                                checkpoint(use_reentrant=False)``); absent when no layer checkpoints
gradient_checkpointing_offload  bool: the checkpointed layers keep their saved inputs in host memory
unsloth_gradient_checkpointing  Unsloth's mode as it ran: ``"unsloth"`` (offloading), True (plain), False (none);
                                what Unsloth recorded on the model beside it (``..._recorded``)
unsloth_block_compile           bool: a decoder-layer class runs Unsloth's compiled forward (one region per layer);
                                those classes in ``unsloth_block_compiled_classes``
activation_offloading           bool: the trainer's step ran inside an activation-offloading context (TRL's and
                                Axolotl's ``OffloadActivations``: every saved tensor over 1 KiB to host memory) that
                                took the step's saved tensors; its class in ``activation_offload_context``, how many
                                tensors the last step gave it in ``activation_offload_tensors``
axolotl_lora_kernels            the kinds of Axolotl's fused LoRA kernels in use (``["mlp", "o", "qkv"]``); on how
                                many modules each in ``axolotl_lora_kernel_modules``; the kinds this model has
                                LoRA-adapted projections for in ``axolotl_lora_kernel_places``
==============================  ====================================================================================

Nothing here imports torch or a toolkit at module level: the read-back works on any object with ``modules()``
(the tests patch a tiny transformers Llama by hand, as each tool does), and only :func:`read_back_callback` imports
transformers, inside the worker.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

LIGER = "liger_kernel"
OFFLOAD = "gradient_checkpointing_offload"
ACT_OFFLOAD = "activation_offloading"
UNSLOTH_GC = "unsloth_gradient_checkpointing"
UNSLOTH_BLOCK_COMPILE = "unsloth_block_compile"
AXOLOTL_KERNELS = "axolotl_lora_kernels"

LIGER_VERSION = "0.8.5"  # the pin of the `base` overlay (harness/running/environments.yaml)

# Checkpoint implementations that move the checkpointed layers' saved inputs to host memory, by function or class
# name: Unsloth's "unsloth" mode (unsloth_zoo.gradient_checkpointing: the smart UnslothCheckpointFunction behind
# unsloth_checkpoint, and the older offloaded checkpointer) and LLaMA-Factory's use_unsloth_gc
# (llamafactory.model.model_utils.checkpointing). Unsloth's unsloth_gradient_checkpoint keeps them on the GPU.
OFFLOADING_CHECKPOINTS = frozenset({
    "UnslothCheckpointFunction", "unsloth_checkpoint", "unsloth_offloaded_gradient_checkpoint",
    "Unsloth_Offloaded_Gradient_Checkpointer", "UnslothGradientCheckpointing",
})
# transformers' own offloading (gradient_checkpointing_enable(offload=True)): torch's save_on_cpu around checkpoint
_HF_OFFLOAD_QUALNAME = "gradient_checkpointing_enable.<locals>.checkpoint_func"
_TORCH_CHECKPOINT = "torch.utils.checkpoint.checkpoint"

# Axolotl's fused LoRA kernels (axolotl.monkeypatch.lora_kernels): the attribute each binds on a layer's module
_AXOLOTL_KERNEL_ATTRS = {"apply_qkv": "qkv", "apply_o": "o", "forward": "mlp"}
# where each can go: a module whose projections all carry a LoRA adapter (axolotl.monkeypatch.lora_kernels patches
# the attention modules and the dense MLPs it finds so)
AXOLOTL_KERNEL_PLACES = "axolotl_lora_kernel_places"
_AXOLOTL_KERNEL_PLACES = {"qkv": ("q_proj", "k_proj"), "o": ("o_proj",), "mlp": ("gate_proj", "up_proj", "down_proj")}


# -- what a row asks for, and the verdict ------------------------------------------------------------------------
def expect(ctx, **switches: Any) -> None:  # noqa: ANN001
    """Record the switches the row's native config asks for (``ctx.extra["switches"]``), to be read back."""
    ctx.extra.setdefault("switches", {}).update(switches)


def mismatches(expected: dict[str, Any], effective: dict[str, Any]) -> list[tuple[str, str]]:
    """Switches the live run did not show as asked: ``(key, reason)`` pairs, empty when every one took effect.

    A switch that was never read back counts too: a row cannot claim a switch nobody saw.
    """
    out = []
    for key, want in expected.items():
        if key not in effective:
            out.append((key, f"asked for {want!r}, not read back from the live run"))
        elif effective[key] != want:
            out.append((key, f"asked for {want!r}, the live run has {effective[key]!r}"))
    return out


def settle(ctx) -> None:  # noqa: ANN001
    """Mark the run invalid (``ctx.cannot_honour``) for every switch in ``extra["switches"]`` that did not take
    effect. Call it after training, when the read-back has run."""
    for key, why in mismatches(ctx.extra.get("switches", {}), ctx.effective):
        ctx.cannot_honour(f"switch {key}", why)


def require_liger(tool: str) -> None:
    """Stop a row that asks for Liger-Kernel where it is not installed, with how to install it.

    Raises:
        RuntimeError: ``liger_kernel`` is not importable in this worker's environment.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        raise RuntimeError(
            f"unavailable: liger-kernel not installed in the {tool} environment (the row asks for Liger-Kernel): "
            f"`python -m harness env create base` adds liger-kernel=={LIGER_VERSION} to the `base` overlay every "
            f"environment sees (offline: its bundle, `python -m harness env pack base`), or "
            f"`pip install --no-deps liger-kernel=={LIGER_VERSION}`")


def read_back_callback(ctx, read: Callable[[Any], dict[str, Any]]) -> Any:  # noqa: ANN001
    """A transformers ``TrainerCallback`` that records ``read(model)`` in ``ctx.effective`` at the first step begin.

    List it before ``ctx.trainer_callbacks()``: callbacks run in list order, so the reading is done before the
    measuring callback starts the step's clock. At the first step the tool has applied everything (Trainer applies
    ``use_liger_kernel`` and gradient checkpointing inside ``train()``).
    """
    from transformers import TrainerCallback  # heavy, and absent where validation runs

    class SwitchReadBack(TrainerCallback):
        def __init__(self) -> None:
            self.done = False

        def on_step_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003, ANN202
            if not self.done and model is not None:
                ctx.set_effective(**read(model))
                self.done = True

    return SwitchReadBack()


# -- read-back from the live model -------------------------------------------------------------------------------
def _origin(obj: Any) -> str:
    """``module.qualname`` of a function, method or class (the function under a bound method)."""
    obj = getattr(obj, "__func__", obj)
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _from_package(obj: Any, package: str) -> bool:
    module = getattr(getattr(obj, "__func__", obj), "__module__", None) or ""
    return module == package or module.startswith(package + ".")


def read_liger(model: Any) -> dict[str, Any]:
    """What Liger-Kernel replaced on a live model, however it was applied.

    Liger patches in two ways, both seen here: before the model is built it swaps the architecture's classes
    (``LlamaRMSNorm`` -> ``LigerRMSNorm``, ``LlamaForCausalLM.forward`` -> ``lce_forward``: Axolotl's plugin,
    LLaMA-Factory); on a built model it binds its forwards to the existing modules (``Trainer``'s
    ``use_liger_kernel``, TRL). Its RoPE is a module-level function of the architecture's modeling module.

    Returns:
        ``{"liger_kernel": bool, "liger_patches": {replacement: count}}``.
    """
    patches: Counter[str] = Counter()
    modeling_modules = set()
    for mod in model.modules():
        cls = type(mod)
        modeling_modules.add(cls.__module__)
        if _from_package(cls, LIGER):
            patches[cls.__name__] += 1
            continue
        fwd = mod.__dict__.get("forward") or getattr(cls, "forward", None)
        if fwd is not None and _from_package(fwd, LIGER):
            # a bound LigerRMSNorm.forward counts as LigerRMSNorm; a plain function (lce_forward) by its name
            qualname = getattr(fwd, "__func__", fwd).__qualname__.rsplit("<locals>.", 1)[-1]
            patches[qualname.split(".")[0]] += 1
    for name in modeling_modules:
        rope = getattr(sys.modules.get(name), "apply_rotary_pos_emb", None)
        if rope is not None and _from_package(rope, LIGER):
            patches[rope.__name__] += 1
    return {"liger_kernel": bool(patches), "liger_patches": dict(sorted(patches.items()))}


def _unwrap(fn: Any) -> tuple[list[str], dict[str, Any]]:
    """The names along a checkpoint function's wrappers, outermost first, and the keywords its partials bind.

    Follows ``functools.partial`` (``.func``), ``functools.wraps`` (``__wrapped__``) and bound classmethods
    (``torch.autograd.Function.apply``: its class is named, as ``UnslothGradientCheckpointing``).
    """
    names: list[str] = []
    keywords: dict[str, Any] = {}
    for _ in range(16):  # wrappers nest a few levels; the bound stops a cycle
        if fn is None:
            break
        if isinstance(fn, functools.partial):
            keywords = {**fn.keywords, **keywords}  # an outer partial's keyword wins
            fn = fn.func
            continue
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, type):
            names.append(f"{owner.__module__}.{owner.__qualname__}")
        names.append(_origin(fn))
        fn = getattr(fn, "__wrapped__", None)
    return list(dict.fromkeys(names)), keywords


def _describe(fn: Any) -> tuple[str, bool]:
    """(readable description, offloads?) of one checkpoint function."""
    names, keywords = _unwrap(fn)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    offload = bool(leaves & OFFLOADING_CHECKPOINTS) or any(_HF_OFFLOAD_QUALNAME in n for n in names)
    # torch's checkpoint without use_reentrant runs the reentrant CheckpointFunction (with a warning); Unsloth's
    # "unsloth" mode swaps that class for its offloading one, so what runs depends on the class installed now
    via = ""
    if _TORCH_CHECKPOINT in names and keywords.get("use_reentrant", True):
        cls = getattr(sys.modules.get("torch.utils.checkpoint"), "CheckpointFunction", None)
        if cls is not None:
            via = f" -> {_origin(cls)}"
            offload = offload or cls.__name__ in OFFLOADING_CHECKPOINTS
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(keywords.items()))
    return " -> ".join(names) + (f"({args})" if args else "") + via, offload


def _is_checkpointing_layer(mod: Any) -> bool:
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(mod).__mro__)


def read_checkpointing(model: Any) -> dict[str, Any]:
    """Which checkpoint function the live model's checkpointed layers call, and whether it offloads.

    transformers' ``GradientCheckpointingLayer`` (each decoder layer) calls its ``_gradient_checkpointing_func``
    when ``gradient_checkpointing`` is set and the model trains; tools install their own there (LLaMA-Factory) or
    patch what it calls (Unsloth).

    Returns:
        ``{"gradient_checkpointing_offload": bool}`` plus ``"checkpoint_function"`` when a layer checkpoints.
    """
    mods = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
            and callable(getattr(m, "_gradient_checkpointing_func", None))]
    layers = [m for m in mods if _is_checkpointing_layer(m)] or mods  # decoder layers call it; their parent too
    if not layers:
        return {OFFLOAD: False}
    described = list(dict.fromkeys(_describe(m._gradient_checkpointing_func) for m in layers))
    return {"checkpoint_function": "; ".join(d for d, _ in described), OFFLOAD: any(o for _, o in described)}


def read_unsloth_checkpointing(model: Any) -> dict[str, Any]:
    """Unsloth's checkpoint mode as the live model runs it: ``"unsloth"`` when the checkpointed layers offload
    (Unsloth's smart offloading checkpoint), True when they checkpoint on the GPU, False when none checkpoints.

    What Unsloth decided is not enough: it turns ``"unsloth"`` into True below 512 tokens, and transformers'
    non-reentrant checkpoint bypasses its offloading class; so the mode is read from the function installed.
    """
    eff = read_checkpointing(model)
    mode: bool | str = False
    if "checkpoint_function" in eff:
        mode = "unsloth" if eff[OFFLOAD] else True
    eff[UNSLOTH_GC] = mode
    # what Unsloth recorded (FastLlamaModel.patch_peft_model sets it on the PEFT model), kept beside for the record
    recorded = getattr(model, "_unsloth_gradient_checkpointing", None)
    if recorded is not None:
        eff["unsloth_gradient_checkpointing_recorded"] = recorded
    return eff


# the mark Unsloth sets on the forward it installs on a decoder-layer class (unsloth.models._block_compile)
_UNSLOTH_BLOCK_MARK = "_unsloth_block_compiled"


def read_unsloth_block_compile(model: Any) -> dict[str, Any]:
    """Whether Unsloth's per-layer compile is installed: a module class of the live model whose ``forward`` carries
    Unsloth's mark, and which classes."""
    classes = sorted({type(m).__name__ for m in model.modules()
                      if getattr(getattr(type(m), "forward", None), _UNSLOTH_BLOCK_MARK, False)})
    return {UNSLOTH_BLOCK_COMPILE: bool(classes), "unsloth_block_compiled_classes": classes}


def read_trainer_model(model: Any) -> dict[str, Any]:
    """What every HF-Trainer-based row reads back: Liger-Kernel (:func:`read_liger`) and the checkpoint function
    (:func:`read_checkpointing`)."""
    return read_liger(model) | read_checkpointing(model)


# where the trainers keep the context their training step runs in: TRL's SFTTrainer (``maybe_activation_offload_
# context``), Axolotl's ActivationOffloadingMixin (``activation_offload_context``); a nullcontext when off
_OFFLOAD_CONTEXT_ATTRS = ("maybe_activation_offload_context", "activation_offload_context")
_OFFLOAD_HOOKS = "OffloadActivations"  # trl.models.activation_offloading, which Axolotl uses too


def read_activation_offloading(trainer: Any) -> dict[str, Any]:
    """Whether a trainer's steps ran inside an activation-offloading context, read after training.

    TRL and Axolotl build the context in the trainer's constructor (``OffloadActivations``, a
    ``saved_tensors_hooks``) and enter it around each training step. Its class alone shows it was built; the number
    it gave the last step's saved tensors (``tensor_id``: reset when the step enters it, one more per tensor the
    step saved) shows that the step ran inside it.
    """
    hooks = next((h for a in _OFFLOAD_CONTEXT_ATTRS if (h := getattr(trainer, a, None)) is not None), None)
    if hooks is None:
        return {ACT_OFFLOAD: False}
    offloads = any(c.__name__ == _OFFLOAD_HOOKS for c in type(hooks).__mro__)
    tensors = getattr(hooks, "tensor_id", None) if offloads else None
    return {ACT_OFFLOAD: offloads and isinstance(tensors, int) and tensors > 0,
            "activation_offload_context": _origin(type(hooks)), "activation_offload_tensors": tensors}


def read_axolotl_lora_kernels(model: Any) -> dict[str, Any]:
    """Axolotl's fused LoRA kernels on the live model: the kinds in use and on how many modules.

    Axolotl binds ``apply_qkv`` / ``apply_o`` on each attention module and ``forward`` on each MLP to functions of
    ``axolotl.kernels.lora`` when ``lora_qkv_kernel`` / ``lora_o_kernel`` / ``lora_mlp_kernel`` are on (its
    fallbacks live in ``axolotl.monkeypatch``, so they do not count).
    """
    counts: Counter[str] = Counter()
    places: set[str] = set()
    for mod in model.modules():
        for attr, kind in _AXOLOTL_KERNEL_ATTRS.items():
            fn = mod.__dict__.get(attr)
            if fn is not None and _from_package(fn, "axolotl.kernels"):
                counts[kind] += 1
        places.update(kind for kind, projections in _AXOLOTL_KERNEL_PLACES.items()
                      if all(hasattr(getattr(mod, p, None), "lora_A") for p in projections))
    return {AXOLOTL_KERNELS: sorted(counts), "axolotl_lora_kernel_modules": dict(sorted(counts.items())),
            AXOLOTL_KERNEL_PLACES: sorted(places)}


def narrow_axolotl_kernels(ctx) -> None:  # noqa: ANN001
    """Expect only the fused LoRA kernels this model has a place for (``axolotl_lora_kernel_places``, read back).

    Axolotl turns all three kernels on for every LoRA model; one whose projections carry no LoRA adapter (a
    mixture-of-experts model's experts are not ``nn.Linear`` modules, so ``all-linear`` leaves them out) has nothing
    for that kernel to fuse, and Axolotl skips it. That is the tool's rule, not a switch that failed: the run says
    so (``extra["tool_rule"]``) rather than counting it as not honoured.
    """
    asked, places = ctx.extra.get("switches", {}).get(AXOLOTL_KERNELS), ctx.effective.get(AXOLOTL_KERNEL_PLACES)
    if asked is None or places is None:
        return
    idle = [k for k in asked if k not in places]
    if idle:
        ctx.extra["switches"][AXOLOTL_KERNELS] = [k for k in asked if k in places]
        kernels = ", ".join(f"lora_{k}_kernel" for k in idle)
        needs = "; ".join("/".join(_AXOLOTL_KERNEL_PLACES[k]) for k in idle)
        ctx.extra["tool_rule"] = (f"Axolotl's {kernels} on, with nothing to fuse: no module of this model has {needs} "
                                  "all with a LoRA adapter")
