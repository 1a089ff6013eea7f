"""Preference objectives on the trainer: DPO and ORPO, as TRL 1.16 defines them, on the fused LM head; the loop
that trains them and KTO (whose rows and loss are :mod:`kernels.trainer.kto`'s).

Data: a *pair* is a dict of token lists ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions with their EOS,
already truncated: the caller tokenises as the tool it is compared with does). Pairs are read in the HF Trainer's
order (:func:`kernels.trainer.batches.step_rows`: ``micro_batch`` pairs per forward, ``grad_accum`` per step).

One forward per micro-batch holds every chosen and every rejected sequence (``prompt + chosen``, ``prompt +
rejected``; chosen first, as TRL concatenates them), in one of three layouts (``ObjectiveOptions.pair_layout``),
the same function each way:

- ``packed`` (default): one row, the sequences back to back, position ids restarting per sequence so each attends
  only to itself (flash varlen attention on CUDA); no padding.
- ``shared_prompt``: one row of ``[prompt, chosen, rejected]`` per pair, each prompt computed once for both of its
  completions (:class:`kernels.trainer.attention.SharedPrompts`): the prompt tokens' work is halved, exactly (a
  causal prompt does not see what follows it). The meter still counts both sequences in full
  (:meth:`PairBatch.meter_view`), as every other framework feeds them.
- ``padded``: ``2 x pairs`` right-padded rows, as TRL feeds them.

Only the positions that predict a scored token go through the LM head
(:meth:`kernels.trainer.model.DecoderModel.token_logprobs`, the chunked
:func:`kernels.ops.fused_linear_logprobs.fused_linear_logprobs`): no ``[2 x pairs, seq, vocab]`` logits.

Formulas (TRL 1.16, ``trl/trainer/dpo_trainer.py`` ``_compute_loss`` and ``trl/experimental/orpo``):

- **DPO**: ``logp`` = sum of a completion's token log-probs (prompt tokens not scored), under the policy and
  under the reference; margin ``d = (logp_c - ref_c) - (logp_r - ref_r)``; per pair ``-logsigmoid(beta d)``
  (``sigmoid``), ``relu(1 - beta d)`` (``hinge``), ``(d_avg - 1 / (2 beta))^2`` with each log-ratio divided by
  its completion's token count (``ipo``), the label-smoothed ``robust`` one, or APO's ``apo_zero`` / ``apo_down``.
  TRL's ``sigmoid`` has no label smoothing (its ``label_smoothing`` enters ``robust`` and losses not built here).
  The reference is the same model with its LoRA adapters switched off
  (:func:`kernels.trainer.linear.adapters_disabled`), run under ``no_grad`` in the same step, as TRL does for a
  PEFT model without ``precompute_ref_log_probs``: no second copy of the model.
- **ORPO**: ``logp`` = *mean* token log-prob of each completion; ``log_odds = (logp_c - logp_r) -
  (log1mexp(logp_c) - log1mexp(logp_r))``; loss ``NLL(chosen) - beta * mean(logsigmoid(log_odds))``, the NLL over
  every token of ``prompt + chosen`` but the first (TRL's ``cross_entropy_loss`` on the chosen rows), averaged
  over those tokens.
- **Averaging**: each micro-batch's loss is the mean over its pairs; the step's gradient is the sum over its
  micro-batches of ``loss / micro-batches`` (the HF Trainer divides by the accumulation steps when the batch has no
  ``labels`` to count ``num_items_in_batch`` from, as preference batches have not). The reported step loss and
  statistics (TRL's names: ``rewards/chosen`` = ``beta * (logp_c - ref_c)`` for DPO, ``beta * logp_c`` for ORPO;
  ``rewards/accuracies``, ``rewards/margins``) are the means of the micro-batches' values, as TRL logs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from kernels.ops.fused_linear_logprobs import sequence_logprobs
from kernels.trainer.attention import SharedPrompts
from kernels.trainer.batches import IGNORE_INDEX, step_rows
from kernels.trainer.config import DPO_LOSS_TYPES, ObjectiveOptions, TrainSettings
from kernels.trainer.kto import LabelledBatch, collate_labelled, kto_check, kto_micro_batch_loss, kto_reference
from kernels.trainer.linear import Linear, adapters_disabled
from kernels.trainer.train import StepHook, begin_step, prepare_training, retrying


@dataclass
class PairBatch:
    """One collated micro-batch of pairs: the model's input and which positions are scored.

    Attributes:
        input_ids: ``[1, T]`` packed or ``[2 x pairs, S]`` right-padded token ids.
        position_ids: ``[1, T]`` positions within each sequence (packed layouts), or None.
        shared: the attention layout of pairs sharing their prompt (``shared_prompt``), or None.
        rows: ``[N]`` flat positions scored (each predicts ``targets``; a prompt's last position is scored twice
            when the prompt is shared: once for each completion's first token).
        targets: ``[N]`` the token each scored position predicts.
        sequence: ``[N]`` which sequence each scored position belongs to (chosen ``i``, rejected ``pairs + i``).
        completion: ``[N]`` True where the predicted token is a completion token (False: a prompt token, scored
            for ORPO's NLL only).
        completion_tokens: ``[2 x pairs]`` fp32 completion lengths (IPO's normaliser).
        scored_completion: ``[2 x pairs]`` fp32 completion tokens actually predicted (ORPO's mean; one fewer than
            the length only when the prompt is empty: the first token of a sequence has nothing to predict it).
        pairs: how many pairs.
        counted: what a step meter counts (:meth:`meter_view`), on the CPU.
        reference_forwards: forwards without gradient over the same sequences in a step (DPO's reference: 1;
            ORPO: 0).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    shared: SharedPrompts | None
    rows: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor
    completion: torch.Tensor
    completion_tokens: torch.Tensor
    scored_completion: torch.Tensor
    pairs: int
    counted: dict[str, torch.Tensor]
    reference_forwards: int

    def to(self, device: torch.device | str) -> PairBatch:
        """The model's tensors on ``device`` (``counted`` stays on the CPU: counting it needs no device sync)."""
        moved = {k: (v.to(device) if isinstance(v, (torch.Tensor, SharedPrompts)) and k != "counted" else v)
                 for k, v in vars(self).items()}
        return PairBatch(**moved)

    def meter_view(self) -> dict[str, torch.Tensor]:
        """What a step meter counts: every ``prompt + chosen`` and ``prompt + rejected`` sequence once, packed
        (``input_ids``, ``attention_mask``, ``position_ids``: tokens and samples, whatever the layout: a shared
        prompt still counts for both of its sequences, as every other framework feeds it twice), and as
        ``labels`` the scored tokens at their own positions (the usual unshifted-labels convention)."""
        return self.counted

    def no_grad_work(self, precomputed: bool) -> tuple[int, int]:
        """``(tokens, forwards)`` of the step's forwards without gradient (the reference pass, not in tokens/s):
        none where the reference was computed before training."""
        forwards = 0 if precomputed else self.reference_forwards
        return forwards * int(self.counted["attention_mask"].sum()), forwards

    @property
    def tokens(self) -> int:
        """Tokens of one forward over the micro-batch's sequences (as the meter counts them)."""
        return int(self.counted["attention_mask"].sum())


def _sequences(pairs: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """``(prompt, completion)`` of every sequence of the micro-batch: the chosen ones first, as TRL orders them."""
    return ([(list(p["prompt_ids"]), list(p["chosen_ids"])) for p in pairs]
            + [(list(p["prompt_ids"]), list(p["rejected_ids"])) for p in pairs])


def _scored(n_prompt: int, n: int, whole: bool) -> range:
    """Positions ``t`` of a ``prompt + completion`` sequence of length ``n`` whose token is predicted (from
    ``t - 1``): the completion's, or (``whole``: ORPO's NLL of the chosen sequence) all but the first."""
    return range(1 if whole else max(n_prompt, 1), n)


def _counted(seqs: list[tuple[list[int], list[int]]], n_pairs: int, objective: str) -> dict[str, torch.Tensor]:
    """The meter's view of a micro-batch: its sequences packed in one row, labels where a token is scored."""
    ids, pos, labels = [], [], []
    for s, (prompt, answer) in enumerate(seqs):
        tokens = prompt + answer
        scored = set(_scored(len(prompt), len(tokens), objective == "orpo" and s < n_pairs))
        ids += tokens
        pos += range(len(tokens))
        labels += [tok if t in scored else IGNORE_INDEX for t, tok in enumerate(tokens)]
    row = torch.tensor([ids])
    return {"input_ids": row, "attention_mask": torch.ones_like(row), "position_ids": torch.tensor([pos]),
            "labels": torch.tensor([labels])}


def collate_pairs(pairs: Sequence[dict], pad_id: int, objective: str, layout: str = "packed") -> PairBatch:
    """The micro-batch of ``pairs`` as one forward's input (module docstring).

    Args:
        pairs: dicts of token lists ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
        pad_id: padding token id (``padded`` layout only).
        objective: ``dpo`` (completion tokens scored) or ``orpo`` (also the chosen sequences' prompt tokens).
        layout: ``packed``, ``shared_prompt`` or ``padded`` (:class:`~kernels.trainer.config.ObjectiveOptions`).

    Returns:
        The :class:`PairBatch` on the CPU.
    """
    if layout == "shared_prompt":
        return _collate_shared(pairs, objective)
    seqs = _sequences(pairs)
    n_pairs = len(pairs)
    lengths = [len(a) + len(b) for a, b in seqs]
    pack = layout == "packed"
    width = sum(lengths) if pack else max(lengths)
    ids = torch.full((1 if pack else len(seqs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((1, width), dtype=torch.long) if pack else None
    rows, targets, sequence, completion = [], [], [], []
    start = 0
    for s, (prompt, answer) in enumerate(seqs):
        tokens = prompt + answer
        n = len(tokens)
        offset = start if pack else s * width  # flat position of the sequence's first token
        ids.view(-1)[offset:offset + n] = torch.tensor(tokens, dtype=torch.long)
        if pack:
            pos[0, start:start + n] = torch.arange(n)
            start += n
        for t in _scored(len(prompt), n, objective == "orpo" and s < n_pairs):
            rows.append(offset + t - 1)
            targets.append(tokens[t])
            sequence.append(s)
            completion.append(t >= len(prompt))
    return _batch(ids, pos, None, rows, targets, sequence, completion, seqs, n_pairs, objective)


def _collate_shared(pairs: Sequence[dict], objective: str) -> PairBatch:
    """``shared_prompt`` layout: one row of ``[prompt, chosen, rejected]`` per pair, rejected positions continuing
    from the prompt (:class:`~kernels.trainer.attention.SharedPrompts`)."""
    seqs = _sequences(pairs)
    n_pairs = len(pairs)
    ids, pos, doc, branch = [], [], [], []
    rows, targets, sequence, completion = [], [], [], []
    main, rejected, keys, cu_q, cu_k = [0], [], [], [0], [0]
    for i, p in enumerate(pairs):
        prompt, chosen, reject = list(p["prompt_ids"]), list(p["chosen_ids"]), list(p["rejected_ids"])
        n_p, n_c, start = len(prompt), len(chosen), len(ids)
        for side, answer, s in ((1, chosen, i), (2, reject, n_pairs + i)):
            tokens = prompt + answer
            first = start + n_p + (n_c if side == 2 else 0)  # row position of this side's first completion token
            for t in _scored(n_p, len(tokens), objective == "orpo" and side == 1):
                rows.append(start + t - 1 if t - 1 < n_p else first + t - 1 - n_p)  # the shared prompt, or own
                targets.append(tokens[t])
                sequence.append(s)
                completion.append(t >= n_p)
        ids += prompt + chosen + reject
        pos += list(range(n_p + n_c)) + list(range(n_p, n_p + len(reject)))
        doc += [i] * (n_p + n_c + len(reject))
        branch += [0] * n_p + [1] * n_c + [2] * len(reject)
        main += [start + n_p + n_c, len(ids)]
        rejected += range(start + n_p + n_c, len(ids))
        keys += list(range(start, start + n_p)) + list(range(start + n_p + n_c, len(ids)))
        cu_q.append(cu_q[-1] + len(reject))
        cu_k.append(cu_k[-1] + n_p + len(reject))
    main = sorted(set(main))  # an empty completion adds no segment
    shared = SharedPrompts(
        doc=torch.tensor(doc), branch=torch.tensor(branch), cu_main=torch.tensor(main, dtype=torch.int32),
        rejected=torch.tensor(rejected, dtype=torch.long), keys=torch.tensor(keys, dtype=torch.long),
        cu_q=torch.tensor(cu_q, dtype=torch.int32), cu_k=torch.tensor(cu_k, dtype=torch.int32),
        max_main=max(b - a for a, b in zip(main, main[1:], strict=False)),
        max_q=max(b - a for a, b in zip(cu_q, cu_q[1:], strict=False)),
        max_k=max(b - a for a, b in zip(cu_k, cu_k[1:], strict=False)),
    )
    return _batch(torch.tensor([ids]), torch.tensor([pos]), shared, rows, targets, sequence, completion, seqs,
                  n_pairs, objective)


def _batch(ids: torch.Tensor, pos: torch.Tensor | None, shared: SharedPrompts | None, rows: list[int],
           targets: list[int], sequence: list[int], completion: list[bool],
           seqs: list[tuple[list[int], list[int]]], n_pairs: int, objective: str) -> PairBatch:
    completion_t = torch.tensor(completion, dtype=torch.bool)
    sequence_t = torch.tensor(sequence, dtype=torch.long)
    return PairBatch(
        input_ids=ids, position_ids=pos, shared=shared, rows=torch.tensor(rows, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long), sequence=sequence_t, completion=completion_t,
        completion_tokens=torch.tensor([float(len(b)) for _, b in seqs]),
        scored_completion=torch.zeros(len(seqs)).index_add_(0, sequence_t, completion_t.float()),
        pairs=n_pairs, counted=_counted(seqs, n_pairs, objective), reference_forwards=int(objective == "dpo"),
    )


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             completion_tokens: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair loss and rewards, TRL 1.16's formulas (module docstring).

    Args:
        policy: ``[2 x pairs]`` summed completion log-probs under the policy, chosen first.
        reference: the same under the reference (no gradient).
        beta: temperature of the margin.
        loss_type: ``sigmoid`` | ``hinge`` | ``ipo`` | ``robust`` | ``apo_zero`` | ``apo_down``.
        completion_tokens: ``[2 x pairs]`` completion lengths (``ipo`` only).
        label_smoothing: ``robust`` only: the assumed share of flipped preference labels, in ``[0, 0.5)``.

    Returns:
        ``(losses [pairs], chosen_rewards [pairs], rejected_rewards [pairs])``; rewards detached.
    """
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        nc, nr = completion_tokens.chunk(2)
        losses = (chosen_ratio / nc.clamp(min=1.0) - rejected_ratio / nr.clamp(min=1.0) - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean, flipped = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
        losses = ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "apo_zero":  # raise the chosen likelihood, lower the rejected one
        losses = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    elif loss_type == "apo_down":  # lower both, the rejected one more
        losses = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
    else:
        raise ValueError(f"DPO loss_type {loss_type!r}: one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2`` (TRL's ORPO helper)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(mean_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """ORPO's odds-ratio term per pair, TRL's ``odds_ratio_loss``.

    Args:
        mean_logps: ``[2 x pairs]`` mean completion token log-probs under the policy, chosen first.
        beta: weight of the term.

    Returns:
        ``(beta * logsigmoid(log_odds) [pairs], chosen_rewards, rejected_rewards, log_odds)``: the loss subtracts
        the mean of the first; rewards (``beta * mean logp``) and log-odds detached.
    """
    pc, pr = mean_logps.float().chunk(2)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return beta * F.logsigmoid(log_odds), beta * pc.detach(), beta * pr.detach(), log_odds.detach()


def effective_objective(o: ObjectiveOptions) -> dict[str, Any]:
    """What the preference step runs: the objective, ``beta``, DPO's and KTO's ``loss_type``, KTO's weights and
    where the reference log-probs come from (``adapter_disabled``: this model with its adapters switched off; ORPO
    has ``none``)."""
    out: dict[str, Any] = {"objective": o.kind, "beta": o.beta,
                           "reference": "none" if o.kind == "orpo" else o.reference}
    if o.has_reference:
        out["loss_type"] = o.loss_type
    if o.kind == "kto":
        out |= {"desirable_weight": o.desirable_weight, "undesirable_weight": o.undesirable_weight}
    return out


def _check_model(model: torch.nn.Module, objective: ObjectiveOptions) -> None:
    """Refuse what the preference step cannot run (a clear error before any compute)."""
    options = getattr(model, "options", None)
    if getattr(options, "cuda_graph", False):
        raise ValueError(f"{objective.kind}: cuda_graph captures the SFT step only")
    if objective.has_reference:
        if not any(isinstance(m, Linear) and m.lora_A is not None for m in model.modules()):
            raise ValueError(f"{objective.kind}: the reference is the frozen base with the adapters switched off, so "
                             "the method must be lora, dora or qlora (full fine-tuning would need a second model)")
        if getattr(model, "streamer", None) is not None:
            raise ValueError(f"{objective.kind}: offload_weights streams layers in checkpointed passes only; the "
                             "reference pass runs without gradients")


def dpo_reference(model: torch.nn.Module, b: PairBatch) -> torch.Tensor:
    """``[2 x pairs]`` summed completion log-probs of the micro-batch's sequences under the reference: the model
    with its adapters switched off, without gradient."""
    with torch.no_grad(), adapters_disabled(model.modules()):
        ref_tokens = model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids, b.shared)
        return sequence_logprobs(ref_tokens, b.sequence, 2 * b.pairs)


def micro_batch_loss(model: torch.nn.Module, b: PairBatch, o: ObjectiveOptions,
                     reference: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's preference loss: DPO's reference pass (no gradient, adapters off) and policy pass, or
    ORPO's single pass, through the chunked LM head on the scored positions.

    Args:
        model: a :class:`kernels.trainer.model.DecoderModel`.
        b: the collated micro-batch, on the model's device.
        o: the objective.
        reference: DPO's reference log-probs computed before training (:func:`precompute_reference`), or None:
            computed here.

    Returns:
        The loss (mean over the micro-batch's pairs; differentiable) and its statistics under TRL's names
        (detached device scalars).
    """
    n_seq = 2 * b.pairs
    if o.kind == "dpo":
        reference = dpo_reference(model, b) if reference is None else reference
        policy = sequence_logprobs(model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids, b.shared),
                                   b.sequence, n_seq)
        losses, chosen, rejected = dpo_loss(policy, reference, o.beta, o.loss_type, b.completion_tokens,
                                            o.label_smoothing)
        loss = losses.mean()
        stats = {"logps/chosen": policy.detach()[:b.pairs].mean(), "logps/rejected": policy.detach()[b.pairs:].mean()}
    else:
        tokens = model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids, b.shared)
        in_chosen = b.sequence < b.pairs  # every scored position of a chosen sequence: ORPO's NLL
        nll = -(tokens * in_chosen).sum() / in_chosen.sum().clamp(min=1)
        per_token = b.completion / b.scored_completion.clamp(min=1)[b.sequence]  # mean over each completion
        mean_logps = sequence_logprobs(tokens, b.sequence, n_seq, weights=per_token)
        ratio, chosen, rejected, log_odds = orpo_odds_ratio(mean_logps, o.beta)
        loss = nll - ratio.mean()
        stats = {"nll_loss": nll.detach(), "log_odds_ratio": (ratio.detach() / o.beta).mean(),
                 "log_odds_chosen": log_odds.mean(), "logps/chosen": mean_logps.detach()[:b.pairs].mean(),
                 "logps/rejected": mean_logps.detach()[b.pairs:].mean()}
    stats |= {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
              "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean()}
    return loss, stats


def preference_step(model: torch.nn.Module, batches: list[PairBatch | LabelledBatch], o: ObjectiveOptions,
                    params: list[torch.Tensor], s: TrainSettings, opt: torch.optim.Optimizer,
                    references: list[torch.Tensor] | None = None,
                    retry: Callable[[], bool] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of each micro-batch (its loss / the step's micro-batches), clipping, optimizer step;
    ``references``: each micro-batch's precomputed reference log-probs, or None; ``retry``: as
    :func:`kernels.trainer.train.optimizer_step`'s (a planner's leaner plan after running out of memory).

    Returns:
        The step loss and the step's statistics, as device scalars: each the mean over the micro-batches that have
        it (a KTO micro-batch without good rows has no ``rewards/chosen``: NaN there, as TRL logs nothing).
    """
    total, sums, counts = retrying(lambda: _pair_forwards_backwards(model, batches, o, references), opt, retry)
    if s.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    opt.step()
    return total, {k: sums[k] / counts[k] for k in sums}


def _pair_forwards_backwards(model: torch.nn.Module, batches: list[PairBatch | LabelledBatch], o: ObjectiveOptions,
                             references: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict, dict]:
    n = len(batches)
    total = torch.zeros((), dtype=torch.float32, device=batches[0].input_ids.device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, b in enumerate(batches):
        ref = references[i] if references is not None else None
        loss, stats = (kto_micro_batch_loss if o.kind == "kto" else micro_batch_loss)(model, b, o, ref)
        (loss / n).backward()
        total += loss.detach() / n
        for k, v in stats.items():
            has = ~torch.isnan(v)
            sums[k] = sums.get(k, 0) + torch.where(has, v.float(), 0.0)
            counts[k] = counts.get(k, 0) + has.float()
    return total, sums, counts


def _collate(pairs: Sequence[dict], idx: range, s: TrainSettings, o: ObjectiveOptions) -> PairBatch | LabelledBatch:
    rows = [pairs[i] for i in idx]
    return collate_labelled(rows, o) if o.kind == "kto" else collate_pairs(rows, s.pad_id, o.kind, o.pair_layout)


@dataclass
class Precomputed:
    """DPO's or KTO's reference log-probs of every micro-batch the steps read, computed before training.

    Attributes:
        logps: per micro-batch (its ``(first, end)`` row indices) the reference log-probs, on the device.
        tokens: tokens of the forwards that computed them.
        forwards: how many forwards (one per distinct micro-batch).
        seconds: how long it took (the device synchronised).
    """

    logps: dict[tuple[int, int], torch.Tensor]
    tokens: int
    forwards: int
    seconds: float


def precompute_reference(model: torch.nn.Module, pairs: Sequence[dict], s: TrainSettings, o: ObjectiveOptions,
                         device: torch.device | str | None = None) -> Precomputed:
    """The reference log-probs of each micro-batch the ``s.steps`` steps read (an epoch's micro-batches, each once),
    from the model with its adapters switched off, before training (TRL's ``precompute_ref_log_probs``): then a
    step runs no reference forward (KTO's KL sequences still go through the policy in every step)."""
    device = device if device is not None else model.device_of_compute
    t0 = time.perf_counter()
    logps: dict[tuple[int, int], torch.Tensor] = {}
    tokens = 0
    for step in range(s.steps):
        for idx in step_rows(len(pairs), s, step):
            if (idx.start, idx.stop) not in logps:
                b = _collate(pairs, idx, s, o).to(device)
                logps[idx.start, idx.stop] = kto_reference(model, b) if o.kind == "kto" else dpo_reference(model, b)
                tokens += b.tokens
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return Precomputed(logps, tokens, len(logps), time.perf_counter() - t0)


def train_preference(model: torch.nn.Module, pairs: Sequence[dict], s: TrainSettings, objective: ObjectiveOptions,
                     meter: StepHook | None = None, device: torch.device | str | None = None,
                     on_first_step: Callable[[torch.optim.Optimizer], None] | None = None,
                     optimizer: torch.optim.Optimizer | None = None,
                     on_step_end: Callable[[int], None] | None = None,
                     precomputed: Precomputed | None = None,
                     on_oom: Callable[[int], bool] | None = None) -> list[dict[str, float]]:
    """Train ``model`` on preference ``pairs`` (KTO: labelled rows) for ``s.steps`` optimizer steps.

    The loop of :func:`kernels.trainer.train.train` (same optimizer, scheduler, clipping, data order and hooks)
    with :func:`preference_step` for the step.

    Args:
        model: a :class:`kernels.trainer.model.DecoderModel` (LoRA / DoRA / QLoRA for DPO and KTO).
        pairs: dicts of token lists ``prompt_ids``, ``chosen_ids``, ``rejected_ids``; for KTO ``prompt_ids``,
            ``completion_ids`` and a boolean ``label`` (:mod:`kernels.trainer.kto`).
        s: loop settings; ``micro_batch`` counts pairs (KTO: rows).
        objective: ``dpo``, ``orpo`` or ``kto`` with its settings.
        meter: a :class:`~kernels.trainer.train.StepHook`, fed each micro-batch's ``meter_view()``.
        device: where batches go (default: the model's device).
        on_first_step: called with the optimizer inside the first timed step, before any compute.
        optimizer: use this optimizer instead of :func:`~kernels.trainer.train.make_optimizer`.
        on_step_end: called with the number of finished optimizer steps after the step's clock stopped.
        precomputed: the reference log-probs (:func:`precompute_reference`) where ``objective.reference`` is
            ``precomputed``; computed here when not given.
        on_oom: called with the step (0-based) whose forwards and backwards ran out of memory; True: the step is
            done again (a planner moved the model to a leaner plan).

    Returns:
        Per step: ``loss`` and TRL's logged statistics (``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; DPO and ORPO add ``rewards/accuracies``, ORPO
        ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``, KTO ``kl``), ``pairs``: the most pairs (KTO: rows) in
        one of its micro-batches, and ``reference_tokens`` / ``reference_forwards``: the step's forwards without
        gradient (DPO's and KTO's reference, KTO's KL estimate) and their tokens.
    """
    if not objective.is_preference:
        raise ValueError(f"train_preference trains dpo, orpo or kto, not {objective.kind!r} (sft: "
                         "kernels.trainer.train)")
    _check_model(model, objective)
    if objective.kind == "kto":
        kto_check(objective, s.micro_batch)
    device, opt, sched, params = prepare_training(model, s, device, optimizer)
    pre = objective.precomputes_reference
    if pre and precomputed is None:
        precomputed = precompute_reference(model, pairs, s, objective, device)
    history: list[dict[str, float]] = []
    for step in range(s.steps):
        ranges = step_rows(len(pairs), s, step)
        batches = [_collate(pairs, idx, s, objective).to(device) for idx in ranges]
        begin_step(meter, step, on_first_step, opt, [b.meter_view() for b in batches])
        refs = [precomputed.logps[idx.start, idx.stop] for idx in ranges] if pre else None
        total, stats = preference_step(model, batches, objective, params, s, opt, refs,
                                       retry=partial(on_oom, step) if on_oom else None)
        opt.zero_grad(set_to_none=True)
        sched.step()
        names = ["loss", *stats]
        values = torch.stack([total, *stats.values()]).tolist()  # the only sync inside the step besides step_end's
        record = dict(zip(names, values, strict=True)) | {
            "pairs": max(b.n if isinstance(b, LabelledBatch) else b.pairs for b in batches),
            "reference_tokens": sum(b.no_grad_work(pre)[0] for b in batches),
            "reference_forwards": sum(b.no_grad_work(pre)[1] for b in batches)}
        if meter is not None:
            meter.step_end(record["loss"])
        history.append(record)
        if on_step_end is not None:
            on_step_end(step + 1)
    return history
