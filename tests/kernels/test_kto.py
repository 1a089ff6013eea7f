"""kernels.trainer.kto: KTO against TRL 1.16's formulas on an independent implementation.

The reference side is transformers + PEFT fed in TRL's layout (right-padded rows of ``prompt + completion`` cut to
``max_length``, then the KL rows: each prompt with the completion of the row before it), with the reference
log-probs from ``disable_adapter()`` and the loss of ``KTOTrainer._compute_loss`` written out here
(``test_kto_trl.py`` checks against TRL's own trainer where the trl environment exists). float32 on the CPU: the
same tolerances as test_preference_trainer.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_preference_trainer import (
    ATOL,
    _compare_grads,
    _peft,
    _per_token_logps,
    grads_by_peft_name,
    lora_model,
    toy_pairs,
)

from kernels.trainer.config import MethodOptions, ObjectiveOptions, TrainSettings
from kernels.trainer.kto import collate_labelled, kto_micro_batch_loss
from kernels.trainer.loading import load_model
from kernels.trainer.preference import effective_objective, precompute_reference, train_preference

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_rows(n: int = 4, seed: int = 0, labels: tuple[bool, ...] = (True, False, False, True)) -> list[dict]:
    """Labelled rows of uneven lengths (one prompt of a single token), good and bad mixed."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(5, 4), (1, 6), (9, 3), (4, 8), (3, 2), (6, 5)]
    return [{"prompt_ids": torch.randint(3, 320, (p,), generator=g).tolist(),
             "completion_ids": torch.randint(3, 320, (c,), generator=g).tolist(), "label": labels[i % len(labels)]}
            for i, (p, c) in enumerate(lengths[:n])]


def _padded(seqs: list[tuple[list[int], int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """TRL's ``DataCollatorForUnpairedPreference``: ``(tokens, prompt length)`` right-padded, completion mask."""
    width = max(len(t) for t, _ in seqs)
    return {"input_ids": torch.tensor([t + [pad_id] * (width - len(t)) for t, _ in seqs]),
            "attention_mask": torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in seqs]),
            "completion_mask": torch.tensor([[0] * p + [1] * (len(t) - p) + [0] * (width - len(t))
                                             for t, p in seqs])}


def _cut(prompt: list[int], completion: list[int], max_length: int | None) -> tuple[list[int], int]:
    tokens = (prompt + completion)[:max_length]
    return tokens, min(len(prompt), len(tokens))


def _logps(peft, batch) -> torch.Tensor:  # noqa: ANN001
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return _per_token_logps(peft, batch, labels).sum(1)


def _trl_kto_loss(peft, rows: list[dict], o: ObjectiveOptions) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
    """TRL 1.16 ``KTOTrainer._compute_loss`` on a PEFT model without a reference model: the loss and its logs."""
    main = _padded([_cut(r["prompt_ids"], r["completion_ids"], o.max_length) for r in rows])
    completions = [r["completion_ids"] for r in rows]
    kl_completions = [completions[-1], *completions[:-1]]  # add_kl_completion_ids
    kl_batch = _padded([_cut(r["prompt_ids"], c, o.max_length) for r, c in zip(rows, kl_completions, strict=True)])
    use_kl = o.loss_type == "kto"
    if use_kl:
        with torch.no_grad():
            kl_logps = _logps(peft, kl_batch)
    logps = _logps(peft, main)
    with torch.no_grad(), peft.disable_adapter():
        ref_kl_logps = _logps(peft, kl_batch) if use_kl else None
        ref_logps = _logps(peft, main)
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0) if use_kl else torch.zeros(1)
    label = torch.tensor([r["label"] for r in rows])
    chosen, rejected = logps[label] - ref_logps[label], logps[~label] - ref_logps[~label]
    if use_kl:
        chosen_losses = 1 - torch.sigmoid(o.beta * (chosen - kl))
        rejected_losses = 1 - torch.sigmoid(o.beta * (kl - rejected))
    else:
        chosen_losses, rejected_losses = 1 - torch.sigmoid(o.beta * chosen), torch.sigmoid(o.beta * rejected)
    losses = torch.cat((o.desirable_weight * chosen_losses, o.undesirable_weight * rejected_losses), 0)
    chosen, rejected = chosen.detach(), rejected.detach()
    logs = {"kl": float(kl), "rewards/chosen": float(o.beta * chosen.sum() / max(len(chosen), 1)),
            "rewards/rejected": float(o.beta * rejected.sum() / max(len(rejected), 1)),
            "logps/chosen": float(logps[label].detach().sum() / max(len(chosen), 1)),
            "logps/rejected": float(logps[~label].detach().sum() / max(len(rejected), 1))}
    logs["rewards/margins"] = logs["rewards/chosen"] - logs["rewards/rejected"]
    return losses.nanmean(), logs


@pytest.mark.parametrize(("loss_type", "max_length", "weights", "seed", "kl"), [
    ("kto", None, (1.0, 1.0), 2, "positive"),
    ("kto", None, (1.0, 1.0), 0, "clamped"),  # the KL sequences' log-ratio is negative on average: KL 0
    ("kto", 10, (1.0, 1.33), 2, None),  # rows and KL rows cut; the weights TRL suggests for 1:1.33 imbalance
    ("apo_zero_unpaired", None, (0.8, 1.0), 2, "clamped"),  # no KL term (TRL logs 0)
])
def test_kto_loss_and_gradients_equal_trls(tiny_llama_fp32, loss_type, max_length, weights, seed, kl):  # noqa: ANN001
    rows = toy_rows()
    o = ObjectiveOptions(kind="kto", beta=0.5, loss_type=loss_type, max_length=max_length,
                         desirable_weight=weights[0], undesirable_weight=weights[1])
    model = lora_model(tiny_llama_fp32, seed=seed)
    peft = _peft(tiny_llama_fp32, model)
    loss, stats = kto_micro_batch_loss(model, collate_labelled(rows, o), o)
    loss.backward()
    ref_loss, logs = _trl_kto_loss(peft, rows, o)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    _compare_grads(model, peft)
    if kl is not None:
        assert (logs["kl"] > 0) == (kl == "positive")
    for name, value in logs.items():
        assert float(stats[name]) == pytest.approx(value, abs=ATOL), name


def test_collate_rotates_completions_cuts_and_counts(tiny_llama_fp32):  # noqa: ANN001
    """KL row i is prompt i + completion i - 1 (the first prompt takes the last completion); every sequence is cut
    to max_length from the start; the meter sees the rows (not the KL rows), labels on completion tokens only;
    the forwards without gradient hold the rows once and the KL rows twice."""
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "label": True},
            {"prompt_ids": [6], "completion_ids": [7], "label": False},
            {"prompt_ids": [8, 9, 10], "completion_ids": [11, 12], "label": True}]
    b = collate_labelled(rows, ObjectiveOptions(kind="kto", max_length=4))
    expected = [1, 2, 3, 4, 6, 7, 8, 9, 10, 11] + [1, 2, 11, 12, 6, 3, 4, 5, 8, 9, 10, 7]
    assert b.input_ids.tolist() == [expected]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3] + [0, 1, 2, 3] * 3]
    assert b.targets.tolist() == [3, 4, 7, 11, 11, 12, 3, 4, 5, 7]
    assert b.sequence.tolist() == [0, 0, 1, 2, 3, 3, 4, 4, 4, 5]
    assert (b.input_ids[0, b.rows + 1] == b.targets).all()  # each scored position predicts the next token
    assert (b.n, b.split, b.kl_tokens, b.label.tolist()) == (3, 10, 12, [True, False, True])
    assert b.meter_view()["labels"].tolist() == [[-100, -100, 3, 4, -100, 7, -100, -100, -100, 11]]
    assert (b.no_grad_work(False), b.no_grad_work(True), b.tokens) == ((34, 3), (12, 1), 22)
    unpaired = collate_labelled(rows, ObjectiveOptions(kind="kto", loss_type="apo_zero_unpaired"))
    assert (unpaired.kl_tokens, unpaired.no_grad_work(False), unpaired.no_grad_work(True)) == (0, (12, 1), (0, 0))
    with pytest.raises(ValueError, match="prompt fills max_length"):
        collate_labelled(rows, ObjectiveOptions(kind="kto", max_length=3))


def test_train_kto_starts_at_half_and_averages_what_each_micro_batch_has(tiny_llama_fp32):  # noqa: ANN001
    """Untrained adapters: policy == reference, KL 0, every row's loss 1 - sigmoid(0) = 0.5. A micro-batch of good
    rows only has no rewards/rejected: the step's value is the other micro-batch's, not a mean with a gap."""
    model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4, lora_alpha=8), dtype=torch.float32,
                       device="cpu", seed=0)
    rows = toy_rows(6, labels=(True, True, False, True, True, False))
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=3, lr=1e-2)
    o = ObjectiveOptions(kind="kto", beta=0.5)
    history = train_preference(model, rows, s, o)
    # step 1: micro-batches of rows 0, 1 (good, good: no rewards/rejected) and rows 2, 3 (bad, good)
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6) and history[0]["kl"] == 0
    assert history[0]["rewards/chosen"] == 0 and history[0]["rewards/rejected"] == 0
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["loss"] != history[0]["loss"]
    # step 2: the epoch's last micro-batch alone (rows 4, 5); step 3 starts the next epoch
    assert math.isfinite(history[1]["rewards/rejected"]) and history[1]["pairs"] == 2
    assert [h["reference_forwards"] for h in history] == [6, 3, 6]
    assert effective_objective(o) == {"objective": "kto", "beta": 0.5, "reference": "adapter_disabled",
                                      "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0}


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_a_precomputed_reference_trains_the_same(tiny_llama_fp32, kind):  # noqa: ANN001
    """The reference computed once per micro-batch before training (TRL's precompute_ref_log_probs) is the frozen
    base's, as the one computed in every step: the same steps, with fewer forwards without gradient (KTO's policy KL
    forward stays in the step). An epoch's micro-batches are computed once however many epochs the steps read."""
    rows = toy_rows(6, labels=(True, False)) if kind == "kto" else toy_pairs(4)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=4, lr=1e-2)
    runs = {}
    for reference in ("adapter_disabled", "precomputed"):
        o = ObjectiveOptions(kind=kind, beta=0.5, reference=reference)
        model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4, lora_alpha=8), dtype=torch.float32,
                           device="cpu", seed=0)
        pre = precompute_reference(model, rows, s, o) if reference == "precomputed" else None
        runs[reference] = train_preference(model, rows, s, o, precomputed=pre), pre
    (in_step, _), (ahead, pre) = runs["adapter_disabled"], runs["precomputed"]
    work = ("reference_tokens", "reference_forwards")
    for a, b in zip(in_step, ahead, strict=True):
        same = {k: v for k, v in b.items() if k not in work}
        assert {k: v for k, v in a.items() if k not in work} == pytest.approx(same, abs=1e-6, nan_ok=True)
    assert pre.forwards == len(pre.logps) == (3 if kind == "kto" else 2)  # the epoch's micro-batches, once each
    if kind == "dpo":
        assert [h["reference_forwards"] for h in ahead] == [0, 0, 0, 0]
        assert [h["reference_forwards"] for h in in_step] == [2, 2, 2, 2]
    else:
        assert [h["reference_forwards"] for h in ahead] == [2, 1, 2, 1]  # the KL sequences under the policy
        assert [h["reference_forwards"] for h in in_step] == [6, 3, 6, 3]


def test_train_kto_refuses_what_it_cannot_run(tiny_llama_fp32):  # noqa: ANN001
    model = lora_model(tiny_llama_fp32)
    rows = toy_rows()
    with pytest.raises(ValueError, match="micro_batch must be 2 or more"):
        train_preference(model, rows, TrainSettings(micro_batch=1, grad_accum=1, steps=1), ObjectiveOptions(kind="kto"))
    with pytest.raises(ValueError, match="packed"):
        train_preference(model, rows, TrainSettings(micro_batch=2, grad_accum=1, steps=1),
                         ObjectiveOptions(kind="kto", pair_layout="padded"))
    full = load_model(tiny_llama_fp32, MethodOptions(kind="full"), dtype=torch.float32, device="cpu", seed=0)
    with pytest.raises(ValueError, match="adapters switched off"):
        train_preference(full, rows, TrainSettings(micro_batch=2, grad_accum=1, steps=1), ObjectiveOptions(kind="kto"))
    with pytest.raises(ValueError, match="kto here has kto, apo_zero_unpaired"):
        ObjectiveOptions(kind="kto", loss_type="sigmoid")


@pytest.mark.gpu
def test_kto_on_the_gpu_follows_the_cpu(tiny_llama_fp32):  # noqa: ANN001
    """bf16 on CUDA (flash varlen attention over the packed rows, the rows' and the KL sequences' slices of it, the
    Triton LM head): the loss, the KL estimate and the LoRA gradients of the fp32 CPU step with the same adapter
    weights, within bf16's error."""
    rows, o = toy_rows(), ObjectiveOptions(kind="kto", beta=0.5, max_length=10)
    cpu = lora_model(tiny_llama_fp32, seed=2)
    gpu = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4, lora_alpha=8), dtype=torch.bfloat16,
                     device="cuda", seed=2)
    adapters = dict(cpu.linears())
    with torch.no_grad():
        for name, m in gpu.linears():
            m.lora_A.copy_(adapters[name].lora_A)
            m.lora_B.copy_(adapters[name].lora_B)
    out = {}
    for device, model in (("cpu", cpu), ("cuda", gpu)):
        loss, stats = kto_micro_batch_loss(model, collate_labelled(rows, o).to(device), o)
        loss.backward()
        out[device] = (float(loss), float(stats["kl"]),
                       {n: g.float().cpu() for n, g in grads_by_peft_name(model).items()})
    (loss, kl, grads), (gpu_loss, gpu_kl, gpu_grads) = out["cpu"], out["cuda"]
    assert kl > 0  # the KL term is in play
    # bf16 activations (rel. 2^-8) summed over ~10 tokens of log-probs of ~-6 each, through a sigmoid of beta 0.5
    assert gpu_loss == pytest.approx(loss, abs=2e-2) and gpu_kl == pytest.approx(kl, abs=0.15)
    for name, want in grads.items():
        torch.testing.assert_close(gpu_grads[name], want, atol=1e-2, rtol=5e-2, msg=name)
