"""litgpt adapter: LitGPT's own checkpoint conversion, data module and finetune script, run in-process.

Flow:

1. Conversion (cached under ``$TUNEBENCH_CACHE/litgpt/``): the HF checkpoint's files are linked into a new
   directory, our architecture is registered as a LitGPT model name (``config.model_config`` added to
   ``litgpt.config.name_to_config``) and LitGPT's own ``convert_hf_checkpoint(dir, model_name=NAME)`` writes
   ``lit_model.pth`` and ``model_config.yaml`` there. ``tokenizer_config.json`` gets ``add_bos_token: true``: our
   tokenizer adds ``<bos>`` (its post-processor), which LitGPT only honours when that key says so.
2. Data: ``config.convert_rows`` -> ``train.jsonl`` (+ ``val.jsonl``: the first micro-batch of rows, used only by
   LitGPT's 2-batch sanity validation before training) for ``litgpt.data.JSON``. LitGPT's train loader shuffles
   with a seeded generator; the adapter writes ``train.jsonl`` in the order that makes LitGPT's first-epoch shuffle
   yield the harness's order (computed with the same ``DataLoader(shuffle=True, generator=seed)``), so every step
   sees the same samples as the other frameworks and LitGPT's own loader is used unchanged.
3. ``config.native_config`` -> ``litgpt_finetune.yaml`` (rerun: ``python -m litgpt finetune_lora --config ...``),
   turned into LitGPT's objects and passed to ``litgpt.finetune.lora.setup`` (``finetune.full.setup`` for full).

The common hook, at the same point of the step as everywhere else (LitGPT has no callbacks; its ``fit`` loop is
``batch = next(CycleIterator(train_dataloader))`` -> forward -> ``fabric.backward(loss / accum)`` -> every
``accum``-th micro-batch ``optimizer.step(); optimizer.zero_grad(); scheduler.step()``). The adapter replaces
three names in the script's module for the duration of the run:

- ``fit``: a wrapper that hands LitGPT's ``fit`` a metered view of ``train_dataloader`` and wraps
  ``optimizer.step``. The metered loader calls ``meter.step_begin()`` when it yields the first micro-batch of an
  optimizer step (after the batch is collated, before the forward) and ``meter.count_batch`` for every micro-batch
  (``attention_mask`` rebuilt from LitGPT's right padding with id 0 — our tokenizer never emits id 0 in text —,
  ``labels`` as LitGPT built them). The wrapped ``optimizer.step`` runs LitGPT's step, then
  ``meter.step_end(loss)``; the effective settings are read from the live model/optimizer on the first step.
- ``chunked_cross_entropy``: unchanged maths; records each training micro-batch's loss so that the step's loss is
  the mean over its micro-batches (what LitGPT's ``RunningMean`` over ``accum`` micro-batches logs).
- ``get_lr_scheduler`` (constant scenarios only): LitGPT's is warmup + cosine and divides by zero with 0 warmup
  steps; the scenario's constant LR is a ``LambdaLR(lambda _: 1.0)``. Recorded in ``extra["patches"]``.

Differences from the hf adapter, on purpose (LitGPT's behaviour is what is measured): the loss of a step is the mean
of per-micro-batch token means (HF weights by tokens across the accumulation); LoRA A matrices are drawn by LitGPT
(other random draws than PEFT's, so curves agree at step 1 and drift later); LitGPT pads with id 0 and has no
attention mask (right padding + causal attention: real tokens are unaffected).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from adapters_for_tools.litgpt import config as lit_config
from harness.inputs.data import read_jsonl, write_jsonl
from harness.inputs.models import cache_root
from harness.measuring.effective import OPTIMIZER_NAMES


def run(ctx) -> None:
    import litgpt.config as lcfg
    import torch

    sc = ctx.scenario
    for setting, why in lit_config.cannot_honour(sc):
        ctx.cannot_honour(setting, why)
    if sc.method.kind == "dora":
        raise ValueError("LitGPT has no DoRA")

    t0 = time.time()
    ckpt = convert_checkpoint(Path(ctx.checkpoint), lcfg)
    ctx.extra["litgpt_checkpoint"] = str(ckpt)
    ctx.extra["convert_s"] = time.time() - t0

    # data: LitGPT rows, ordered so that LitGPT's seeded shuffle yields the harness's order
    meta = json.loads(ctx.dataset_path.with_suffix(".meta.json").read_text())
    rows, notes = lit_config.convert_rows(read_jsonl(ctx.dataset_path), meta["format"])
    if notes:
        ctx.extra["differences"] = notes
    data_dir = ctx.work_dir / "litgpt_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    order = shuffle_order(len(rows), sc.train.seed)
    stored = [None] * len(rows)
    for pos, idx in enumerate(order):  # LitGPT reads stored[idx] at position pos; we want rows[pos] there
        stored[idx] = rows[pos]
    write_jsonl(stored, data_dir / "train.jsonl")
    write_jsonl(rows[: sc.train.micro_batch], data_dir / "val.jsonl")
    ctx.extra["data_order"] = ("train.jsonl stored so that LitGPT's shuffled first epoch is the harness's order; "
                               "val.jsonl = first micro-batch (LitGPT's 2-batch sanity validation only)")
    if lit_config.epochs_for(sc, len(rows)) > 1:
        ctx.extra["data_order"] += "; later epochs in LitGPT's own shuffled order"

    cfg = lit_config.native_config(sc, ckpt, data_dir, ctx.output_dir, len(rows))
    cfg.update(ctx.options.setup)
    cfg_path = ctx.save_native_config("litgpt_finetune.yaml", yaml.safe_dump(cfg, sort_keys=False))
    ctx.extra["rerun"] = lit_config.cli_command(sc, cfg_path, os.environ.get("PYTHONPATH", ""), sys.executable)

    if sc.method.kind == "full":
        from litgpt.finetune import full as script
    else:
        from litgpt.finetune import lora as script
    kwargs = build_setup_kwargs(cfg)
    hook = _Hook(ctx, sc)
    saved = {n: getattr(script, n) for n in ("fit", "chunked_cross_entropy", "get_lr_scheduler")}
    script.fit = hook.wrap_fit(saved["fit"])
    script.chunked_cross_entropy = hook.wrap_loss(saved["chunked_cross_entropy"])
    patches = ["fit (metered loader, optimizer.step -> step_end)", "chunked_cross_entropy (records loss)"]
    if sc.train.lr_scheduler == "constant":
        script.get_lr_scheduler = lambda optimizer, warmup_steps, max_steps: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _step: 1.0)
        patches.append("get_lr_scheduler -> constant LambdaLR (LitGPT: warmup + cosine only; "
                       "0 warmup steps divide by 0)")
        ctx.extra["rerun_note"] = ("the CLI rerun uses LitGPT's schedule (1 warmup step + cosine); "
                                   "the measured run used a constant LR (scenario)")
    ctx.extra["patches"] = patches
    hook.t_setup = time.time()
    # LitGPT saves hyperparameters.yaml (read back by merge_lora) by re-parsing sys.argv with its CLI parser:
    # give it the command line that reruns this configuration
    argv = sys.argv[:]
    sys.argv = ["litgpt", lit_config.script_name(sc), "--config", str(cfg_path)]
    try:
        script.setup(**kwargs)
    finally:
        sys.argv = argv
        for n, f in saved.items():
            setattr(script, n, f)
    final = ctx.output_dir / "final"
    ctx.extra["saved"] = (f"LitGPT LoRA checkpoint {final / 'lit_model.pth.lora'} + merged {final / 'lit_model.pth'}"
                          if sc.method.is_peft else f"LitGPT checkpoint {final / 'lit_model.pth'}")


def convert_checkpoint(hf_dir: Path, lcfg) -> Path:
    """LitGPT-converted copy of ``hf_dir`` (cached; converted by LitGPT's own ``convert_hf_checkpoint``)."""
    hf = json.loads((hf_dir / "config.json").read_text())
    h = hashlib.sha256((json.dumps(hf, sort_keys=True) + str(hf_dir.resolve())).encode()).hexdigest()[:10]
    name = f"{lit_config.MODEL_NAME_PREFIX}{hf_dir.name}-{h}"
    mc = lit_config.model_config(hf, name)
    if mc.pop("tie_embeddings", False):
        raise ValueError("tied word embeddings: LitGPT 0.5.13's Config has no tie flag in this mapping")
    if name not in lcfg.name_to_config:
        lcfg.configs.append(mc)
        lcfg.name_to_config[name] = mc
    out = cache_root() / "litgpt" / name
    if (out / "lit_model.pth").is_file() and (out / "model_config.yaml").is_file():
        return out
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".tmp-", dir=out.parent)) / name  # LitGPT names by directory
    tmp.mkdir()
    try:
        for f in hf_dir.iterdir():
            if f.suffix in (".safetensors", ".bin"):
                os.symlink(f.resolve(), tmp / f.name)
            elif f.is_file():
                shutil.copy2(f, tmp / f.name)
        tc = tmp / "tokenizer_config.json"
        if tc.is_file():
            d = json.loads(tc.read_text())
            d["add_bos_token"] = True  # our tokenizer's post-processor adds <bos>; LitGPT reads this key
            tc.write_text(json.dumps(d, indent=1))
        convert_hf_checkpoint(tmp, model_name=name)
        for f in tmp.iterdir():  # the weights are in lit_model.pth now: drop the links to the HF files
            if f.is_symlink():
                f.unlink()
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "lit_model.pth").is_file():
                raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def shuffle_order(n: int, seed: int) -> list[int]:
    """Dataset indices in the order LitGPT's ``JSON.train_dataloader`` yields them in its first epoch."""
    import torch
    from torch.utils.data import DataLoader

    dl = DataLoader(list(range(n)), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed),
                    num_workers=0, collate_fn=lambda b: b[0])
    return list(dl)


def build_setup_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """LitGPT objects from the CLI-form mapping (what jsonargparse builds from the same YAML)."""
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data import JSON

    kw = dict(cfg)
    kw["checkpoint_dir"] = Path(kw["checkpoint_dir"])
    kw["out_dir"] = Path(kw["out_dir"])
    d = dict(kw["data"]["init_args"])
    d["json_path"] = Path(d["json_path"])
    ps = d.get("prompt_style")
    if isinstance(ps, dict):  # {"class_path": "litgpt.prompts.Default"} as jsonargparse would instantiate it
        import importlib

        mod, cls = ps["class_path"].rsplit(".", 1)
        d["prompt_style"] = getattr(importlib.import_module(mod), cls)(**ps.get("init_args", {}))
    kw["data"] = JSON(**d)
    kw["train"] = TrainArgs(**kw["train"])
    kw["eval"] = EvalArgs(**kw["eval"])
    return kw


class _Hook:
    """The common measurement hook inside LitGPT's ``fit`` (see the module docstring)."""

    def __init__(self, ctx, sc):
        self.ctx, self.sc = ctx, sc
        self.accum = sc.train.grad_accum
        self.micro = 0
        self.losses: list[float] = []
        self.first = True
        self.t_setup: float | None = None

    def wrap_fit(self, fit):
        import inspect

        hook = self

        def metered_fit(*args, **kwargs):
            bound = inspect.signature(fit).bind(*args, **kwargs)
            a = bound.arguments
            state = a.get("state")
            model = a["model"] if "model" in a else state["model"]
            optimizer = a["optimizer"] if "optimizer" in a else state["optimizer"]
            fabric = a["fabric"]
            a["train_dataloader"] = _MeteredLoader(a["train_dataloader"], hook)
            inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            orig_step = optimizer.step

            def step(*s_args, **s_kwargs):
                if hook.first:
                    hook.first = False
                    hook.read_back(model, inner, fabric)
                out = orig_step(*s_args, **s_kwargs)
                loss = sum(hook.losses) / len(hook.losses) if hook.losses else None
                hook.losses = []
                hook.ctx.meter.step_end(loss)
                return out

            optimizer.step = step
            try:
                return fit(*bound.args, **bound.kwargs)
            finally:
                del optimizer.step

        return metered_fit

    def wrap_loss(self, fn):
        import torch

        hook = self

        def recording_loss(*args, **kwargs):
            loss = fn(*args, **kwargs)
            if torch.is_grad_enabled():  # training micro-batches (validation runs under no_grad)
                hook.losses.append(float(loss.detach()))
            return loss

        return recording_loss

    def before_micro_batch(self, batch) -> None:
        if self.micro % self.accum == 0:
            if self.ctx.load_s is None and self.t_setup is not None:
                self.ctx.load_s = time.time() - self.t_setup  # Fabric, model init + load, data, sanity check
            self.ctx.meter.step_begin()
        self.micro += 1
        ids = batch["input_ids"]
        nz = (ids != 0).int()
        # LitGPT right-pads input_ids with 0: a row's length is one past its last non-zero id
        rev = nz.flip(-1).argmax(-1)
        lengths = ids.shape[-1] - rev
        lengths = lengths * nz.any(-1).int()
        import torch

        mask = (torch.arange(ids.shape[-1], device=ids.device)[None, :] < lengths[:, None]).long()
        self.ctx.meter.count_batch({"input_ids": ids, "attention_mask": mask, "labels": batch["labels"]})

    def read_back(self, model, optimizer, fabric) -> None:
        """Effective settings from the live LitGPT model and optimizer (at the first optimizer step)."""
        mod = getattr(model, "module", model)
        cfg = mod.config
        eff: dict[str, Any] = {"train_mode": bool(mod.training)}
        eff["gradient_checkpointing"] = any("Checkpoint" in type(m).__name__ for m in mod.modules())
        quant = None
        double = None
        for m in mod.modules():
            n = type(m).__name__
            if "NF4" in n or "FP4" in n:
                quant = "nf4" if "NF4" in n else "fp4"
                double = "DQ" in n
                break
        eff["quantization"] = quant
        if quant:
            eff["double_quant"] = double
            prec = fabric.strategy.precision
            eff["dtype"] = str(getattr(prec, "dtype", "")).replace("torch.", "") or None
        else:
            frozen = [p for p in mod.parameters() if not p.requires_grad and p.is_floating_point()]
            ref = frozen[0] if frozen else next(mod.parameters())
            eff["dtype"] = str(ref.dtype).replace("torch.", "")
        if self.sc.method.is_peft:
            flags = {f: bool(getattr(cfg, f, False)) for f in ("lora_query", "lora_key", "lora_value",
                                                              "lora_projection", "lora_mlp", "lora_head")}
            live = _live_lora_targets(mod)
            eff.update({"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                        "use_dora": False, "target_modules": live})
            self.ctx.extra["litgpt_lora_flags"] = flags
        eff["trainable_params"] = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        eff["total_params"] = sum(p.numel() for p in mod.parameters())
        name = type(optimizer).__name__
        eff["optimizer"] = OPTIMIZER_NAMES.get(name.lower(), name)
        g = optimizer.param_groups[0]
        eff["lr"] = float(g.get("initial_lr", g["lr"]))
        self.ctx.extra["optimizer_hparams"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                                               if k != "params" and isinstance(v, (int, float, bool, tuple))}
        self.ctx.set_effective(**eff)


class _MeteredLoader:
    """LitGPT's train DataLoader, seen through the hook (same batches, same order)."""

    def __init__(self, loader, hook: _Hook):
        self._loader, self._hook = loader, hook

    def __iter__(self):
        for batch in self._loader:
            self._hook.before_micro_batch(batch)
            yield batch

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _live_lora_targets(model) -> list[str]:
    """HF leaf names of the layers that carry a LoRA in the live LitGPT model."""
    names = set()
    for full, m in model.named_modules():
        if getattr(m, "r", 0) <= 0 or not hasattr(m, "lora_A"):
            continue
        leaf = full.split(".")[-1]
        parent = full.split(".")[-2] if "." in full else ""
        if leaf == "qkv":
            en = getattr(m, "enable_lora", None)
            enabled = ([en.q, en.k, en.v] if hasattr(en, "q") else list(en)) if en is not None else [True] * 3
            names.update(n for n, on in zip(("q_proj", "k_proj", "v_proj"), enabled, strict=True) if on)
        elif leaf == "proj" and parent == "attn":
            names.add("o_proj")
        elif parent == "mlp":
            names.add({"fc_1": "gate_proj", "fc_2": "up_proj", "proj": "down_proj"}.get(leaf, leaf))
        elif leaf == "lm_head":
            names.add("lm_head")
        else:
            names.add(leaf)
    return sorted(names)


