"""Convergence: tunebench's trainer vs a transformers + PEFT reference loop, from the same weights and data.

The reference is the plain loop of ``adapters_for_tools/dummy`` (HF model, PEFT adapters, cross-entropy summed
over the step's loss tokens across grad-accum micro-batches, AdamW, grad clipping). Both sides start from the
same tiny checkpoint, the same LoRA init (our init consumes the RNG exactly as PEFT's; asserted below) and the
same rows (right-padded, uneven lengths, two micro-batches per step with different loss-token counts).

Tolerances (float32 on CPU, where our ops run their float32 references): the two implementations differ only
in float32 rounding order, ~1e-7 relative per op. Measured after 6 steps: loss within 7e-7 (loss ~5.6), parameters
within 3e-8 (SGD, lr 1) and 6e-7 (AdamW, lr 1e-3; parameters travel ~4e-3). Limits: ``LOSS_ATOL = 1e-4`` and
``PARAM_ATOL = 1e-5``, margins for other BLAS builds that still catch real differences: AdamW's default
``weight_decay=0.01`` left in one loop (what this test first caught) moves parameters by ``lr * 0.01 * w`` =
1e-5 per step, a wrong loss normalisation changes the loss in the 2nd decimal.

Tiny matmuls run single-threaded here: with 2 OpenMP threads on a 2-core machine that is also running other
work, each 64-wide matmul spin-waits for ~15 ms (measured), 200x its single-threaded time.
"""

from __future__ import annotations

import random

import pytest
import torch

from harness.inputs.data import pack
from kernels.trainer.batches import IGNORE_INDEX, collate
from kernels.trainer.config import MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.save import peft_state_dict
from kernels.trainer.train import train

STEPS = 6
LOSS_ATOL = 1e-4
PARAM_ATOL = 1e-5
BOS, EOS, PAD = 256, 257, 258
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_llama_fp32):  # noqa: ANN001, ANN201
    return tiny_llama_fp32


def _rows(n: int, seed: int = 0, lo: int = 12, hi: int = 40) -> list[dict]:
    """Rows like harness.inputs.data.tokenize_example: <bos> text <eos>, label -100 on <bos>."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [BOS] + [rng.randrange(97, 123) for _ in range(rng.randint(lo, hi))] + [EOS]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return rows


def _settings(optimizer: str) -> TrainSettings:
    lr = 1.0 if optimizer == "sgd" else 1e-3
    return TrainSettings(micro_batch=2, grad_accum=2, steps=STEPS, lr=lr, optimizer=optimizer, max_grad_norm=1.0,
                         pad_id=PAD)


def _reference(ckpt, kind: str, rows: list[dict], s: TrainSettings):  # noqa: ANN001, ANN202
    """transformers + PEFT trained with the dummy adapter's loop; returns (losses, model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS),
                                                 use_dora=kind == "dora", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=s.lr)
    else:  # weight_decay explicitly: torch's AdamW default is 0.01, the scenario's (and HF's) 0.0
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    losses, i = [], 0
    for _ in range(s.steps):
        batches = []
        for _ in range(s.grad_accum):
            batches.append(collate([rows[(i + k) % len(rows)] for k in range(s.micro_batch)], PAD))
            i += s.micro_batch
        n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                     b["labels"][:, 1:].reshape(-1), reduction="sum") / n_loss
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model


def _ours(ckpt, kind: str, rows: list[dict], s: TrainSettings):  # noqa: ANN001, ANN202
    torch.manual_seed(0)  # the same seed as the reference: our LoRA init draws what PEFT draws
    opts = MethodOptions(kind=kind, lora_r=8, lora_alpha=16, target_modules=TARGETS)
    model = load_model(ckpt, opts, dtype=torch.float32, device="cpu")
    return train(model, rows, s), model


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_losses_and_params_match_reference(ckpt, kind, optimizer):  # noqa: ANN001
    from peft import get_peft_model_state_dict

    s = _settings(optimizer)
    rows = _rows(s.steps * s.micro_batch * s.grad_accum)
    ref_losses, ref = _reference(ckpt, kind, rows, s)
    our_losses, ours = _ours(ckpt, kind, rows, s)
    assert our_losses == pytest.approx(ref_losses, abs=LOSS_ATOL), (our_losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0] - 0.01  # it trained: a test of equal non-learning would be weak
    if kind == "full":
        ref_sd = dict(ref.named_parameters())
        our_sd = dict(ours.named_parameters())
    else:
        ref_sd = get_peft_model_state_dict(ref)
        our_sd = peft_state_dict(ours)
    assert set(our_sd) == set(ref_sd)
    for name, p in our_sd.items():
        torch.testing.assert_close(p.detach(), ref_sd[name].detach(), atol=PARAM_ATOL, rtol=0, msg=name)


def test_lora_init_is_peft_init(ckpt):  # noqa: ANN001
    """Same seed -> bit-identical LoRA A (and zero B) as PEFT's get_peft_model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                         LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    torch.manual_seed(3)
    ours = load_model(ckpt, MethodOptions(kind="lora", lora_r=4, lora_alpha=8), dtype=torch.float32, device="cpu")
    want, got = get_peft_model_state_dict(ref), peft_state_dict(ours)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _loss_sum(model, rows: list[dict], packed: bool = False) -> torch.Tensor:  # noqa: ANN001
    b = collate(rows, PAD)
    return model(b["input_ids"], labels=b["labels"], position_ids=b.get("position_ids") if packed else None)


def test_packed_loss_equals_unpacked(ckpt):  # noqa: ANN001
    """Packed rows (position_ids restart per sample) attend within samples only: loss == per-sample losses."""
    model = load_model(ckpt, MethodOptions(kind="full"), dtype=torch.float32, device="cpu").eval()
    samples = _rows(7, seed=5, lo=5, hi=30)
    packed = pack(samples, 96)
    assert len(packed) >= 2 and all("position_ids" in r for r in packed)
    with torch.no_grad():
        want = sum(_loss_sum(model, [s]) for s in samples)
        got = _loss_sum(model, packed, packed=True)
        # the block-diagonal mask matters: the same rows with plain causal attention give another loss
        leaked = _loss_sum(model, [{k: v for k, v in r.items() if k != "position_ids"} for r in packed])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    assert abs(float(leaked) - float(want)) > 1e-3


def test_right_padding_needs_no_mask(ckpt):  # noqa: ANN001
    """A right-padded batch (no attention mask passed) has exactly the per-row unpadded losses and gradients."""
    samples = _rows(3, seed=9, lo=5, hi=30)
    grads = []
    for batched in (True, False):
        torch.manual_seed(0)
        model = load_model(ckpt, MethodOptions(kind="lora", lora_r=4), dtype=torch.float32, device="cpu")
        for _, mod in model.linears():
            torch.nn.init.normal_(mod.lora_B, std=0.02)
        loss = _loss_sum(model, samples) if batched else sum(_loss_sum(model, [s]) for s in samples)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-4)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
