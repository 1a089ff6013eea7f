"""KTO on the trainer, as TRL 1.16's ``KTOTrainer`` defines it (``trl/trainer/kto_trainer.py``: the collator,
``_prepare_dataset``, ``_compute_kl_logps``, ``_compute_loss``), on the fused LM head.

Data: a *labelled row* is a dict of token lists ``prompt_ids``, ``completion_ids`` (EOS included, not truncated: the
caller tokenises as TRL does) and a boolean ``label`` (a good completion or a bad one). Rows are read in the HF
Trainer's order (:func:`kernels.trainer.batches.step_rows`, TRL's ``train_sampling_strategy: sequential``).

Per micro-batch of ``n`` rows:

- each sequence is ``prompt + completion`` cut to ``max_length`` tokens from the start (TRL's collator);
- the KL estimate's sequences pair each prompt with the completion of the row before it in the micro-batch, the
  first prompt with the last completion (TRL rotates completions by one within each ``per_device_train_batch_size``
  block of the dataset, which with sequential sampling is the micro-batch); cut the same way;
- one forward with gradient over the ``n`` sequences (policy log-probs: the sum over each completion's tokens), one
  without over the KL sequences (policy), one without over both (the reference: the same model with its LoRA
  adapters switched off), every sequence packed into one row, position ids restarting per sequence;
- ``kl = max(0, mean(KL policy - KL reference))``, detached; with ``r`` = policy - reference log-prob of a row, a good
  row's loss is ``1 - sigmoid(beta (r - kl))``, a bad row's ``1 - sigmoid(beta (kl - r))``, weighted by
  ``desirable_weight`` / ``undesirable_weight``; the micro-batch's loss is the mean over its rows
  (``apo_zero_unpaired``: no KL sequences; ``1 - sigmoid(beta r)`` and ``sigmoid(beta r)``);
- statistics under TRL's names: ``kl``, ``rewards/chosen`` (mean ``beta r`` of the good rows), ``rewards/rejected``,
  ``logps/chosen``, ``logps/rejected`` and ``rewards/margins``; a name whose rows the micro-batch lacks is NaN (TRL
  logs nothing for it), and the step averages each name over the micro-batches that have it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.ops.fused_linear_logprobs import sequence_logprobs
from kernels.trainer.batches import IGNORE_INDEX
from kernels.trainer.config import ObjectiveOptions
from kernels.trainer.linear import adapters_disabled


@dataclass
class LabelledBatch:
    """One collated KTO micro-batch: ``n`` rows, then (``kto`` loss) their ``n`` KL sequences, packed in one row.

    Attributes:
        input_ids: ``[1, T]`` every sequence back to back; the rows' sequences are the first ``split`` tokens.
        position_ids: ``[1, T]`` positions within each sequence.
        rows: ``[N]`` flat positions scored (each predicts ``targets``): completion tokens only.
        targets: ``[N]`` the token each scored position predicts.
        sequence: ``[N]`` which sequence each scored position belongs to (row ``i``, its KL sequence ``n + i``).
        label: ``[n]`` True for a good completion.
        n: rows in the micro-batch.
        split: tokens of the rows' sequences (the KL sequences start there).
        kl_tokens: tokens of the KL sequences (0 without them).
        counted: what a step meter counts (:meth:`meter_view`), on the CPU.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor
    label: torch.Tensor
    n: int
    split: int
    kl_tokens: int
    counted: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> LabelledBatch:
        """The model's tensors on ``device`` (``counted`` stays on the CPU)."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
                 if k != "counted"}
        return LabelledBatch(**moved, counted=self.counted)

    def meter_view(self) -> dict[str, torch.Tensor]:
        """What a step meter counts: the rows' sequences (the forward with gradient), packed, with their completion
        tokens as ``labels`` at their own positions; the KL sequences are not trained on."""
        return self.counted

    @property
    def tokens(self) -> int:
        """Tokens of one forward over every sequence of the micro-batch, the KL sequences included."""
        return self.split + self.kl_tokens

    def no_grad_work(self, precomputed: bool) -> tuple[int, int]:
        """``(tokens, forwards)`` of the step's forwards without gradient, as TRL runs them: the KL sequences under
        the policy, then (unless the reference was computed before training) the KL sequences and the rows under
        the reference."""
        if precomputed:
            return (self.kl_tokens, 1) if self.kl_tokens else (0, 0)
        return self.kl_tokens + self.tokens, 3 if self.kl_tokens else 1


def _cut(prompt: list[int], completion: list[int], max_length: int | None) -> tuple[list[int], int]:
    """``prompt + completion`` cut to ``max_length`` from the start, and how many prompt tokens it keeps."""
    tokens = prompt + completion
    if max_length is not None:
        tokens = tokens[:max_length]
    return tokens, min(len(prompt), len(tokens))


def collate_labelled(rows: Sequence[dict], o: ObjectiveOptions) -> LabelledBatch:
    """The micro-batch ``rows`` as one packed input (the module docstring); on the CPU.

    Raises:
        ValueError: a row whose prompt fills ``max_length`` (TRL drops it before training: the caller must too).
    """
    n = len(rows)
    prompts = [list(r["prompt_ids"]) for r in rows]
    completions = [list(r["completion_ids"]) for r in rows]
    seqs = [_cut(p, c, o.max_length) for p, c in zip(prompts, completions, strict=True)]
    if o.loss_type == "kto":  # the row before's completion: the first prompt takes the last completion
        seqs += [_cut(p, completions[i - 1], o.max_length) for i, p in enumerate(prompts)]
    ids, pos, rows_at, targets, sequence = [], [], [], [], []
    for s, (tokens, n_prompt) in enumerate(seqs):
        if n_prompt >= len(tokens):
            raise ValueError(f"kto: a row whose prompt fills max_length {o.max_length} has no completion token left "
                             "(drop it, as TRL does)")
        start = len(ids)
        for t in range(max(n_prompt, 1), len(tokens)):  # the completion's tokens, each predicted from t - 1
            rows_at.append(start + t - 1)
            targets.append(tokens[t])
            sequence.append(s)
        ids += tokens
        pos += range(len(tokens))
    split = sum(len(t) for t, _ in seqs[:n])
    labels = [IGNORE_INDEX] * split
    for row in (r for r, s in zip(rows_at, sequence, strict=True) if s < n):
        labels[row + 1] = ids[row + 1]
    counted = {"input_ids": torch.tensor([ids[:split]]), "attention_mask": torch.ones((1, split), dtype=torch.long),
               "position_ids": torch.tensor([pos[:split]]), "labels": torch.tensor([labels])}
    return LabelledBatch(
        input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), rows=torch.tensor(rows_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long), sequence=torch.tensor(sequence, dtype=torch.long),
        label=torch.tensor([bool(r["label"]) for r in rows]), n=n, split=split, kl_tokens=len(ids) - split,
        counted=counted)


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, label: torch.Tensor, kl: torch.Tensor | None,
             o: ObjectiveOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's per-row loss (weighted) and reward ``beta (policy - reference)``, TRL 1.16's formulas.

    Args:
        policy: ``[n]`` summed completion log-probs under the policy.
        reference: the same under the reference (no gradient).
        label: ``[n]`` True for a good completion.
        kl: the detached KL estimate (``kto`` loss), or None (``apo_zero_unpaired``).
        o: the objective (``beta``, ``loss_type``, the two weights).

    Returns:
        ``(losses [n], rewards [n])``; rewards detached.
    """
    ratio = policy - reference
    if o.loss_type == "kto":
        good, bad = 1 - torch.sigmoid(o.beta * (ratio - kl)), 1 - torch.sigmoid(o.beta * (kl - ratio))
    else:
        good, bad = 1 - torch.sigmoid(o.beta * ratio), torch.sigmoid(o.beta * ratio)
    losses = torch.where(label, o.desirable_weight * good, o.undesirable_weight * bad)
    return losses, o.beta * ratio.detach()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` where ``mask``; NaN where nothing is (no device sync)."""
    return (x * mask).sum() / mask.sum()


def kto_reference(model: torch.nn.Module, b: LabelledBatch) -> torch.Tensor:
    """Summed completion log-probs of every sequence of the micro-batch (the rows, then their KL sequences) under
    the reference: the model with its adapters switched off, without gradient, one forward."""
    with torch.no_grad(), adapters_disabled(model.modules()):
        return sequence_logprobs(model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids), b.sequence,
                                 b.n + (b.n if b.kl_tokens else 0))


def kto_micro_batch_loss(model: torch.nn.Module, b: LabelledBatch, o: ObjectiveOptions,
                         reference: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's KTO loss: the reference and KL forwards without gradient, the policy's with it;
    ``reference``: :func:`kto_reference` computed before training, or None (computed here).

    Returns:
        The loss (mean over the rows; differentiable) and TRL's statistics (detached device scalars; NaN where the
        micro-batch has no row of that label).
    """
    n = b.n
    mine = b.sequence < n
    rows, targets, sequence = b.rows[mine], b.targets[mine], b.sequence[mine]
    kl = None
    if b.kl_tokens:
        theirs = ~mine
        with torch.no_grad():
            kl_policy = sequence_logprobs(
                model.token_logprobs(b.input_ids[:, b.split:], b.rows[theirs] - b.split, b.targets[theirs],
                                     b.position_ids[:, b.split:]), b.sequence[theirs] - n, n)
    reference = kto_reference(model, b) if reference is None else reference
    if b.kl_tokens:
        kl = (kl_policy - reference[n:]).mean().clamp(min=0)
    policy = sequence_logprobs(model.token_logprobs(b.input_ids[:, :b.split], rows, targets,
                                                    b.position_ids[:, :b.split]), sequence, n)
    losses, rewards = kto_loss(policy, reference[:n], b.label, kl, o)
    good, bad = b.label.float(), (~b.label).float()
    logps = policy.detach()
    stats = {"rewards/chosen": _masked_mean(rewards, good), "rewards/rejected": _masked_mean(rewards, bad),
             "logps/chosen": _masked_mean(logps, good), "logps/rejected": _masked_mean(logps, bad)}
    stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    stats["kl"] = kl if kl is not None else torch.zeros((), device=policy.device)
    return losses.mean(), stats


def kto_check(o: ObjectiveOptions, micro_batch: int) -> None:
    """Refuse what KTO cannot run here (a clear error before any compute)."""
    if o.pair_layout != "packed":
        raise ValueError(f"kto: pair_layout {o.pair_layout!r} arranges pairs; kto's rows and KL sequences are packed")
    if o.loss_type == "kto" and micro_batch < 2:
        raise ValueError("kto: the KL estimate pairs each prompt with another row's completion of the same "
                         "micro-batch: micro_batch must be 2 or more")
