"""kernels.trainer.preference: DPO and ORPO against TRL 1.16's formulas on an independent implementation.

The reference side is transformers + PEFT (the model TRL trains) fed in TRL's layout (``2 x pairs`` right-padded
rows, chosen first, ``completion_mask``), with the reference log-probs from ``disable_adapter()``, and the loss
formulas written out here from TRL 1.16's source (``trl/trainer/dpo_trainer.py`` ``_compute_loss``,
``trl/experimental/orpo/orpo_trainer.py`` ``odds_ratio_loss`` / ``get_batch_logps`` / ``concatenated_forward``):
``DPOTrainer`` computes its loss inline in ``_compute_loss``, which needs a whole trainer around it, so the formulas
are restated (``test_preference_trl.py`` checks these restatements against TRL's own code where the trl environment
exists). Tolerances: float32 on the CPU, both sides' ops are float32 references that differ in the order of
operations only: ``1e-5`` on losses of order 1 and on gradients of order 1e-2 .. 1 (measured: < 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.ops.fused_linear_logprobs import sequence_logprobs
from kernels.trainer.config import MethodOptions, ObjectiveOptions, TrainSettings
from kernels.trainer.linear import adapters_disabled
from kernels.trainer.loading import load_model
from kernels.trainer.preference import collate_pairs, micro_batch_loss, train_preference
from kernels.trainer.save import PEFT_PREFIX, peft_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5


def toy_pairs(n: int = 3, seed: int = 0) -> list[dict]:
    """Prompt / chosen / rejected token lists of uneven lengths (one prompt of a single token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, 320, (k,), generator=g).tolist()

    lengths = [(5, 4, 7), (1, 6, 2), (9, 3, 3), (4, 8, 5)]
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in lengths[:n]]


def lora_model(ckpt, kind: str = "lora", seed: int = 0, perturb: bool = True):  # noqa: ANN001, ANN202
    """A tiny model whose adapters are not at their init (B = 0 would make policy == reference)."""
    model = load_model(ckpt, MethodOptions(kind=kind, lora_r=4, lora_alpha=8), dtype=torch.float32, device="cpu",
                       seed=seed)
    if perturb:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for _, m in model.linears():
                if m.lora_B is not None:
                    m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
                if m.magnitude is not None:
                    m.magnitude.mul_(1 + 0.1 * torch.randn(m.magnitude.shape, generator=g))
    return model


def _peft(ckpt, model):  # noqa: ANN001, ANN202
    """transformers + PEFT with the same adapter weights as ``model``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    adapted = [(n, m) for n, m in model.linears() if m.lora_A is not None]
    first, targets = adapted[0][1], sorted({n.rsplit(".", 1)[-1] for n, _ in adapted})
    cfg = LoraConfig(r=first.lora_r, lora_alpha=first.lora_alpha, lora_dropout=0.0,
                     use_dora=first.magnitude is not None, target_modules=targets)
    peft = get_peft_model(hf, cfg)
    sd = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in peft_state_dict(model).items()}
    result = set_peft_model_state_dict(peft, sd)
    assert not result.unexpected_keys, result.unexpected_keys
    return peft.train()


def _trl_batch(pairs: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """TRL's ``DataCollatorForPreference`` (no truncation): ``[prompt + chosen]`` rows, then ``[prompt + rejected]``."""
    seqs = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    comp = ([[0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"]) for p in pairs]
            + [[0] * len(p["prompt_ids"]) + [1] * len(p["rejected_ids"]) for p in pairs])
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    completion = torch.tensor([c + [0] * (width - len(c)) for c in comp])
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def _per_token_logps(model, batch, labels) -> torch.Tensor:  # noqa: ANN001
    """``[rows, seq - 1]`` log-probs of the next token where ``labels[:, 1:] != -100`` (else 0), from full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * keep


def _trl_dpo_loss(peft, batch, beta: float, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """TRL 1.16 ``DPOTrainer._compute_loss`` (reverse KL, one loss type, no ld_alpha / weighting):
    the loss and the per-pair margin of rewards."""
    cm = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(cm == 0, -100)
    logps = _per_token_logps(peft, batch, labels).sum(1)
    with torch.no_grad(), peft.disable_adapter():
        ref_logps = _per_token_logps(peft, batch, labels).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_lr, rejected_lr = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        per_seq = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        per_seq = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # log-ratios divided by the completion token counts
        cmask, rmask = cm.chunk(2)
        per_seq = (chosen_lr / cmask.sum(1).clamp(min=1.0) - rejected_lr / rmask.sum(1).clamp(min=1.0)
                   - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":  # label_smoothing 0.2 in the test
        ls = 0.2
        clean_loss_term = -(1 - ls) * F.logsigmoid(beta * delta)
        flipped_loss_term = -ls * F.logsigmoid(-beta * delta)
        per_seq = (clean_loss_term - flipped_loss_term) / (1 - 2 * ls)
    elif loss_type == "apo_zero":
        per_seq = 1 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
    else:  # apo_down
        per_seq = torch.sigmoid(beta * chosen_lr) + 1 - torch.sigmoid(beta * (chosen_lr - rejected_lr))
    return per_seq.mean(), (beta * (chosen_lr - rejected_lr)).detach()


def _trl_orpo_loss(peft, batch, beta: float) -> torch.Tensor:  # noqa: ANN001
    """TRL 1.16 ``ORPOTrainer.get_batch_loss_metrics``: NLL over every chosen token (prompt included) minus the
    mean of ``beta * logsigmoid(log_odds)`` of the mean completion log-probs."""
    n = batch["input_ids"].shape[0] // 2
    cm = batch["completion_mask"]
    all_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    nll = torch.nn.CrossEntropyLoss()(logits[:n, :-1].reshape(-1, logits.shape[-1]), all_labels[:n, 1:].reshape(-1))
    labels = batch["input_ids"].masked_fill(cm == 0, -100)[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mean_logps = (logp * mask).sum(-1) / mask.sum(-1)
    pc, pr = mean_logps.chunk(2)

    def log1mexp(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return nll - (beta * F.logsigmoid(log_odds)).mean()


def grads_by_peft_name(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {}
    for name, m in model.linears():
        for attr, leaf in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                           ("magnitude", "lora_magnitude_vector.default.weight")):
            p = getattr(m, attr)
            if p is not None:
                out[f"{PEFT_PREFIX}{name}.{leaf}"] = p.grad
    return out


def _compare_grads(model, peft) -> None:  # noqa: ANN001
    ours = grads_by_peft_name(model)
    theirs = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, atol=ATOL, rtol=1e-4, msg=name)


LAYOUTS = ["packed", "shared_prompt", "padded"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down"])
def test_dpo_loss_and_gradients_equal_trls(tiny_llama_fp32, loss_type, layout):  # noqa: ANN001
    pairs = toy_pairs()
    model = lora_model(tiny_llama_fp32)
    peft = _peft(tiny_llama_fp32, model)
    objective = ObjectiveOptions(kind="dpo", beta=0.5, loss_type=loss_type, pair_layout=layout,
                                 label_smoothing=0.2 if loss_type == "robust" else 0.0)
    loss, stats = micro_batch_loss(model, collate_pairs(pairs, 0, "dpo", layout), objective)
    loss.backward()
    want, margins = _trl_dpo_loss(peft, _trl_batch(pairs), 0.5, loss_type)
    want.backward()
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(stats["rewards/margins"], margins.mean(), atol=ATOL, rtol=0)
    assert abs(float(margins.mean())) > 1e-3  # the adapters moved the policy away from the reference
    _compare_grads(model, peft)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_orpo_loss_and_gradients_equal_trls(tiny_llama_fp32, kind, layout):  # noqa: ANN001
    pairs = toy_pairs()
    model = lora_model(tiny_llama_fp32, kind)
    peft = _peft(tiny_llama_fp32, model)
    objective = ObjectiveOptions(kind="orpo", beta=0.2, pair_layout=layout)
    loss, _ = micro_batch_loss(model, collate_pairs(pairs, 0, "orpo", layout), objective)
    loss.backward()
    want = _trl_orpo_loss(peft, _trl_batch(pairs), 0.2)
    want.backward()
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=0)
    _compare_grads(model, peft)


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_reference_pass_is_the_base_model(tiny_llama_fp32, kind):  # noqa: ANN001
    """With the adapters switched off, the trained model scores exactly as the base (a model at its adapter init,
    which computes the base's function) and differently from itself with the adapters on."""
    b = collate_pairs(toy_pairs(), 0, "dpo", "padded")
    model, base = lora_model(tiny_llama_fp32, kind), lora_model(tiny_llama_fp32, kind, perturb=False)
    with torch.no_grad():
        with adapters_disabled(model.modules()):
            off = model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids)
        on = model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids)
        want = base.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids)
    torch.testing.assert_close(off, want, atol=ATOL, rtol=0)
    assert (on - want).abs().max() > 1e-3
    assert not any(m.adapter_disabled for _, m in model.linears())  # switched back on when the block ends


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False):  # noqa: ANN001, ANN202
    """What flash varlen attention computes, sample by sample with SDPA on the CPU: causal, aligned bottom-right
    where a sample has more keys than queries (query i sees keys up to i + n_k - n_q)."""
    assert window_size == (-1, 0), "the trainer must ask for causal attention"
    out = torch.empty_like(q)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(qs, qs[1:], ks, ks[1:], strict=False):
        assert b - a <= max_q and d - c <= max_k
        allowed = torch.ones(b - a, d - c, dtype=torch.bool).tril(diagonal=(d - c) - (b - a))
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
                                           attn_mask=allowed, enable_gqa=enable_gqa)
        out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_shared_prompt_varlen_path_equals_its_mask(tiny_llama_fp32, monkeypatch, objective):  # noqa: ANN001
    """``shared_prompt`` through the two flash varlen calls (gathers, bottom-right causal, scatter back) == the same
    layout through its bool mask: loss and LoRA gradients. Flash itself needs a GPU; per-sample SDPA stands in."""
    from kernels.trainer import attention as A

    b = collate_pairs(toy_pairs(4), 0, objective, "shared_prompt")
    out = {}
    for path in ("mask", "varlen"):
        calls = []
        if path == "varlen":
            def counted(*args, calls=calls, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
                calls.append(1)
                return _varlen_stand_in(*args, **kw)

            monkeypatch.setattr(A, "VARLEN", (counted, {"window_size": (-1, 0)}, True))
            monkeypatch.setattr(A, "_varlen_ok", lambda h: True)
        model = lora_model(tiny_llama_fp32)
        loss, _ = micro_batch_loss(model, b, ObjectiveOptions(kind=objective))
        loss.backward()
        out[path] = loss.detach(), grads_by_peft_name(model)
        # 2 calls per layer in each forward: (reference +) policy + the policy's recompute in backward
        assert len(calls) == (0 if path == "mask" else 2 * 2 * (3 if objective == "dpo" else 2)), len(calls)
    torch.testing.assert_close(out["varlen"][0], out["mask"][0], atol=1e-6, rtol=0)
    for name, g in out["mask"][1].items():
        torch.testing.assert_close(out["varlen"][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


class _VocabTensors(TorchDispatchMode):
    """Records the largest new floating-point tensor whose last dimension is the vocabulary (logits-like; views,
    such as the transposed LM head ``[H, V]``, hold no memory of their own)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dpo_step_never_holds_all_logits(tiny_llama_fp32, monkeypatch, layout):  # noqa: ANN001
    """A DPO micro-batch (reference pass, policy pass, backward) with the LM head's Triton op (interpreted) and a
    chunk smaller than the scored rows: no tensor with the vocabulary as last dimension is larger than one
    ``[chunk, vocab]`` chunk, let alone ``[2 x pairs, seq, vocab]``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4, fused_ce_chunk=4,
                                                      reference_ops=("rms_norm", "rope", "swiglu")),
                       dtype=torch.float32, device="cpu", seed=0)
    b = collate_pairs(toy_pairs(), 0, "dpo", layout)
    vocab = model.cfg.vocab_size
    with _VocabTensors(vocab) as seen:
        loss, _ = micro_batch_loss(model, b, ObjectiveOptions(kind="dpo"))
        loss.backward()
    assert b.rows.numel() > 4
    assert seen.largest == 4 * vocab, seen.largest  # one [chunk, vocab] logits buffer


def test_dpo_steps_raise_the_reward_margin(tiny_llama_fp32):  # noqa: ANN001
    pairs = toy_pairs(4)
    model = lora_model(tiny_llama_fp32, perturb=False)
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=8, lr=5e-3)
    history = train_preference(model, pairs, s, ObjectiveOptions(kind="dpo", beta=0.5))
    margins = [h["rewards/margins"] for h in history]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: the policy is the reference
    assert margins[-1] > 0.5 and history[-1]["rewards/accuracies"] == 1.0, margins
    assert history[-1]["loss"] < history[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # log 2 at margin 0


def test_orpo_trains_full_finetuning_and_dpo_refuses_it(tiny_llama_fp32):  # noqa: ANN001
    s = TrainSettings(micro_batch=2, grad_accum=1, steps=3, lr=1e-3)
    full = load_model(tiny_llama_fp32, MethodOptions(kind="full"), dtype=torch.float32, device="cpu", seed=0)
    history = train_preference(full, toy_pairs(4), s, ObjectiveOptions(kind="orpo"))
    assert history[-1]["nll_loss"] < history[0]["nll_loss"]
    with pytest.raises(ValueError, match="lora, dora or qlora"):
        train_preference(full, toy_pairs(4), s, ObjectiveOptions(kind="dpo"))


class _Meter:
    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.losses: list[float] = []

    def step_begin(self) -> None:
        pass

    def count_batch(self, batch: dict) -> None:
        self.batches.append(batch)

    def step_end(self, loss: float) -> None:
        self.losses.append(loss)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meter_sees_every_sequence_once(tiny_llama_fp32, layout):  # noqa: ANN001
    """The meter counts prompt + chosen and prompt + rejected tokens (no padding; a shared prompt twice) and the
    completion tokens as loss tokens, once per micro-batch: the reference pass is not a second batch."""
    pairs = toy_pairs(4)
    meter = _Meter()
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=1, lr=1e-3)
    objective = ObjectiveOptions(kind="dpo", pair_layout=layout)
    history = train_preference(lora_model(tiny_llama_fp32), pairs, s, objective, meter=meter)
    assert len(meter.batches) == 2 and meter.losses == [history[0]["loss"]]
    tokens = sum(int(b["attention_mask"].sum()) for b in meter.batches)
    loss_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in meter.batches)
    assert tokens == sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    assert loss_tokens == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    samples = sum(int((b["position_ids"] == 0).sum()) for b in meter.batches)
    assert samples == 2 * len(pairs)


@pytest.mark.gpu
def test_dpo_layouts_agree_on_the_gpu(tiny_llama_fp32):  # noqa: ANN001
    """bf16 on CUDA: the packed and shared-prompt micro-batches (flash varlen attention, in two calls with gathered
    keys for the shared prompts; the Triton LM head) score every sequence as the padded rows (SDPA) do, and give
    their loss and LoRA gradients. Adapters perturbed: the policy is away from the reference."""
    pairs, o = toy_pairs(4), ObjectiveOptions(kind="dpo", beta=0.5)
    out = {}
    for layout in LAYOUTS:
        model = load_model(tiny_llama_fp32, MethodOptions(kind="lora", lora_r=4), dtype=torch.bfloat16,
                           device="cuda", seed=0)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, m in model.linears():
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
        b = collate_pairs(pairs, 0, "dpo", layout).to("cuda")
        with torch.no_grad():
            logps = sequence_logprobs(model.token_logprobs(b.input_ids, b.rows, b.targets, b.position_ids, b.shared),
                                      b.sequence, 2 * b.pairs)
        loss, _ = micro_batch_loss(model, b, o)
        loss.backward()
        out[layout] = logps.float().cpu(), float(loss), grads_by_peft_name(model)
    logps, loss, grads = out["padded"]
    for layout in ("packed", "shared_prompt"):
        # bf16 activations (rel. 2^-8) summed over ~10 tokens of log-probs of ~-6 each; two attention kernels.
        # Gradients (up to ~0.2 here, fp32 CPU: layouts agree to 2e-7) through bf16 activations: ~2-5 % apart
        torch.testing.assert_close(out[layout][0], logps, atol=0.15, rtol=2e-2, msg=layout)
        assert out[layout][1] == pytest.approx(loss, abs=2e-2), layout
        for name, want in grads.items():
            torch.testing.assert_close(out[layout][2][name].float(), want.float(), atol=1e-2, rtol=5e-2,
                                       msg=f"{layout} {name}")
