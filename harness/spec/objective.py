"""A scenario's training objective: supervised fine-tuning (the default) or a preference / RL objective.

The ``objective:`` section says *what* the model is trained to do, beside ``method:`` (which parameters train)::

    objective:
      kind: dpo              # sft | dpo | orpo | kto | grpo
      beta: 0.1              # dpo/kto: how far from the reference; orpo: the odds-ratio weight (lambda); grpo: KL
      loss_type: sigmoid     # dpo: sigmoid | ipo | hinge | robust | apo_zero | apo_down; kto: kto | apo_zero_unpaired
      reference: auto        # where reference log-probs come from (below)
      eval_pairs: tasks/tb_pref_eval_last.jsonl  # held-out pairs: reward accuracy of the saved output

Each kind takes only its own settings; the ones left out get the kind's default (the values TRL, Unsloth, Axolotl
and LLaMA-Factory share), written into the resolved scenario. A setting that does not apply to the kind is an
error, not silently ignored.

Reference (``reference``), for the objectives that compare with the starting model:

- ``auto``: ``adapter_disabled`` for LoRA/QLoRA/DoRA, ``copy`` for full fine-tuning (every tool's default);
- ``copy``: a frozen second copy of the starting model, run beside the policy;
- ``adapter_disabled``: the policy itself with its adapters switched off (PEFT methods only: no second copy);
- ``precomputed``: reference log-probs computed once over the dataset before the first step;
- ``none``: no reference (ORPO is reference-free; GRPO without its KL term, ``beta: 0``).

Units of the batch: ``train.micro_batch`` counts pairs for dpo/orpo (each step's forward holds chosen and
rejected: twice the rows), labelled completions for kto, and completions for grpo (``micro_batch x grad_accum /
num_generations`` prompts per optimizer step, each sampled ``num_generations`` times).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.inputs import preference
from harness.inputs.data import detect_format, read_jsonl, resolve_path, samples_needed

OBJECTIVES = ("sft", "dpo", "orpo", "kto", "grpo")
PREFERENCE = ("dpo", "orpo", "kto")  # trained on labelled completions; scored by reward accuracy on held-out pairs
LOSS_TYPES = {
    "dpo": ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"),
    "kto": ("kto", "apo_zero_unpaired"),
    # grpo: sequence-mean (the paper's), dr_grpo (a constant), dapo (tokens of the whole step), bnpo (of the batch)
    "grpo": ("grpo", "dr_grpo", "dapo", "bnpo"),
}
REWARDS = ("exact_match",)  # the answer generated up to the first newline or end of text equals the row's answer
MAX_BETA = 1000.0  # beta scales log-probability ratios of a few nats: 1000 already makes any loss a step function

# the settings each kind takes, and their defaults (TRL's, which the other tools share)
DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "reference": "auto", "eval_pairs": None},
    "orpo": {"beta": 0.1, "reference": "none", "eval_pairs": None},
    "kto": {"beta": 0.1, "loss_type": "kto", "reference": "auto", "desirable_weight": 1.0,
            "undesirable_weight": 1.0, "eval_pairs": None},
    "grpo": {"beta": 0.0, "loss_type": "grpo", "reference": None, "num_generations": 4, "max_new_tokens": 16,
             "temperature": 1.0, "reward": "exact_match"},
}


class ObjectiveSpec(BaseModel):
    """The ``objective:`` section (see the module docstring). Default: ``kind: sft``, which has no settings."""

    # as harness.spec.scenario's sections: unknown keys, infinite numbers and values of another type are errors
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    kind: Literal["sft", "dpo", "orpo", "kto", "grpo"] = "sft"
    beta: float | None = Field(None, ge=0, le=MAX_BETA)
    loss_type: str | None = None
    reference: Literal["auto", "copy", "adapter_disabled", "precomputed", "none"] | None = None
    desirable_weight: float | None = Field(None, gt=0, le=1000)  # kto: weight of the good completions' loss
    undesirable_weight: float | None = Field(None, gt=0, le=1000)  # kto: weight of the bad ones'
    num_generations: int | None = Field(None, ge=2, le=1024)  # grpo: completions sampled per prompt (a group)
    max_new_tokens: int | None = Field(None, ge=1, le=1 << 20)  # grpo: longest completion sampled
    temperature: float | None = Field(None, gt=0, le=100)  # grpo: sampling temperature
    reward: Literal["exact_match"] | None = None  # grpo: reward function (REWARDS)
    # dpo/orpo/kto: held-out prompt/chosen/rejected JSONL (relative to the scenario file) scored after each run
    eval_pairs: str | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "sft")
        out = {**DEFAULTS.get(kind, {}), **data}
        if kind == "grpo" and "reference" not in data:
            beta = out.get("beta")
            # no KL term, no reference; with one, the reference is chosen as for DPO
            out["reference"] = "none" if beta == 0 else "auto"
        return out

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        allowed = DEFAULTS[self.kind]
        given = [k for k in type(self).model_fields if k != "kind" and getattr(self, k) is not None]
        stray = [k for k in given if k not in allowed]
        if stray:
            takes = ", ".join(allowed) or "no other settings"
            raise ValueError(f"{', '.join(stray)} not used by objective {self.kind!r} (it takes: {takes})")
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES.get(self.kind, ()):
            raise ValueError(f"loss_type {self.loss_type!r} is not a {self.kind} loss "
                             f"(one of: {', '.join(LOSS_TYPES[self.kind])})")
        if self.kind in PREFERENCE and not self.beta:
            raise ValueError(f"{self.kind} needs beta > 0 (it scales the {self.kind} loss)")
        if self.kind == "orpo" and self.reference != "none":
            raise ValueError("orpo is reference-free: reference must be 'none'")
        if self.kind in ("dpo", "kto") and self.reference == "none":
            raise ValueError(f"{self.kind} compares with a reference: reference 'auto', 'copy', 'adapter_disabled' "
                             "or 'precomputed'")
        if self.kind == "grpo" and (self.beta == 0) != (self.reference == "none"):
            raise ValueError("grpo: reference 'none' goes with beta 0 (no KL term), and beta > 0 needs a reference")
        if self.kind == "grpo" and self.reference == "precomputed":
            raise ValueError("grpo samples its completions while training: their reference log-probs cannot be "
                             "computed beforehand (reference 'auto', 'copy' or 'adapter_disabled')")
        return self

    @property
    def is_sft(self) -> bool:
        return self.kind == "sft"

    def reference_for(self, is_peft: bool) -> str | None:
        """The reference that runs: ``auto`` resolved for the method (None for sft)."""
        if self.reference == "auto":
            return "adapter_disabled" if is_peft else "copy"
        return self.reference

    def expected(self, is_peft: bool) -> dict[str, Any]:
        """The settings an adapter reads back from the live trainer, as the scenario asks for them (the keys of
        ``harness.measuring.effective``): ``objective`` (the kind) and every setting of the kind, ``reference``
        resolved; ``eval_pairs`` is the evaluator's, not the trainer's. Empty for sft."""
        if self.is_sft:
            return {}
        out: dict[str, Any] = {"objective": self.kind}
        for key in DEFAULTS[self.kind]:
            if key != "eval_pairs":
                out[key] = self.reference_for(is_peft) if key == "reference" else getattr(self, key)
        return out


class WarmStartSpec(BaseModel):
    """``model.warm_start``: the checkpoint trained briefly on supervised rows once, before any framework loads it
    (``harness.inputs.warmstart``). What an RL objective needs from a model without a hub: a random model never
    generates a right answer, so GRPO would see only zero rewards. Every framework then starts from the same
    warm checkpoint; the untrained baseline of the evaluations is that checkpoint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    data: str = Field(min_length=1, max_length=4096)  # an SFT JSONL (Alpaca, messages, ...), relative to the scenario
    steps: int = Field(ge=1, le=100_000)  # optimizer steps, one micro-batch each
    micro_batch: int = Field(16, ge=1, le=4096)
    lr: float = Field(5e-4, gt=0, le=10)  # AdamW, constant
    seq_len: int = Field(128, ge=8, le=1 << 20)  # rows are cut here
    seed: int = Field(0, ge=0, le=2**32 - 1)


def problems(sc: Any) -> list[tuple[tuple, str]]:
    """The objective against the rest of a schema-valid scenario (method, data, batch).

    Returns:
        ``(location, reason)`` pairs, empty when they fit.
    """
    ob, d, t = sc.objective, sc.data, sc.train
    if ob.is_sft:
        return []
    out: list[tuple[tuple, str]] = []
    if ob.reference == "adapter_disabled" and not sc.method.is_peft:
        out.append((("objective", "reference"), f"adapter_disabled needs adapters to disable (method lora, qlora or "
                                                f"dora, not {sc.method.kind}); full fine-tuning compares with a copy"))
    if d.packing:
        out.append((("data", "packing"), f"packing applies to sft: {ob.kind} keeps each sequence in a row of its own"))
    if d.prompt_loss:
        out.append((("data", "prompt_loss"), f"prompt_loss applies to sft: {ob.kind} scores completions only"))
    if d.format is not None:
        out.append((("data", "format"), f"data.format names sft row formats; {ob.kind} reads rows by their keys "
                                        "(prompt/chosen/rejected, prompt/completion/label, prompt/answer): leave it "
                                        "out"))
    if ob.kind == "grpo":
        if d.source != "jsonl":
            out.append((("data", "source"), "grpo rewards answers: give a jsonl of prompt/answer rows (or Alpaca or "
                                            "prompt/chosen/rejected rows), e.g. tasks/tb_prompts_add.jsonl"))
        if (t.micro_batch * t.grad_accum) % ob.num_generations:
            out.append((("objective", "num_generations"), f"a step's {t.micro_batch * t.grad_accum} completions "
                        f"(micro_batch x grad_accum) must be whole groups of num_generations ({ob.num_generations})"))
        if ob.max_new_tokens >= d.seq_len:
            out.append((("objective", "max_new_tokens"), f"{ob.max_new_tokens} leaves no room for a prompt in "
                                                         f"seq_len ({d.seq_len})"))
    if ob.kind == "kto" and ob.loss_type == "kto" and t.micro_batch < 2:
        out.append((("train", "micro_batch"), "kto estimates its KL term from mismatched completions of the same "
                                              "micro-batch: micro_batch must be 2 or more"))
    return out


def file_problems(sc: Any, source: str) -> tuple[list[tuple[tuple, str]], list[str]]:
    """The files an objective reads, opened: the training rows, ``eval_pairs``, and ``model.warm_start``'s data.

    Returns:
        ``(problems, notes)``: problems as ``(location, reason)``.
    """
    ob = sc.objective
    out: list[tuple[tuple, str]] = []
    ws = sc.model.warm_start
    if ws is not None and not (path := resolve_path(ws.data, source)).is_file():
        out.append((("model", "warm_start", "data"), f"file {ws.data!r} not found (relative paths are relative to "
                                                     "the scenario file)"))
    elif ws is not None:
        try:
            detect_format(next(iter(read_jsonl(path)), {}))
        except ValueError as e:
            out.append((("model", "warm_start", "data"), f"{ws.data}: {e}"))
    if ob.is_sft:
        return out, []
    notes: list[str] = []
    d = sc.data
    exact = sc.model.weights == "random"
    if d.source == "jsonl" and d.path and (path := resolve_path(d.path, source)).exists():
        found, notes = preference.check_file(path, d.path, ob.kind, d.seq_len, num_samples=d.num_samples,
                                             exact_tokens=exact, max_new_tokens=ob.max_new_tokens,
                                             needed=samples_needed(sc))
        out += [(("data", "path"), p) for p in found]
    if ob.eval_pairs:
        path = resolve_path(ob.eval_pairs, source)
        if not path.exists():
            out.append((("objective", "eval_pairs"), f"file {ob.eval_pairs!r} not found (relative paths are relative "
                                                     "to the scenario file)"))
        else:
            # scored whole, by the evaluator (harness.analysis.reward): the form only, no length limit
            found, _ = preference.check_file(path, ob.eval_pairs, "dpo", 1 << 20, exact_tokens=False)
            out += [(("objective", "eval_pairs"), p) for p in found]
    return out, notes
