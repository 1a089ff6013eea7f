"""Data-parallel tunebench (kernels/trainer/distributed.py): two gloo processes equal one process on the global batch.

Two ranks with micro-batch ``B`` and one process with micro-batch ``2B`` read the same rows in each optimizer step
(the HF Trainer's round-robin of micro-batches over ranks), normalise by the same loss tokens and sum the same
gradients, so their losses and trained weights agree up to float32 rounding order: DDP for LoRA and QLoRA (the
adapters' gradients all-reduced), FSDP2 for full fine-tuning, LoRA and QLoRA (every layer sharded, a 4-bit base
included). The rows are ragged (padding in every micro-batch, different loss tokens per rank) and each step has two
micro-batches per rank, so accumulation across micro-batches and the global loss-token count are both exercised.

Tolerances (float32 on CPU, the ops' PyTorch references): the two sides differ in the order of summation (two
partial sums added by the all-reduce instead of one), ~1e-7 relative. Measured after 4 steps: losses within 1e-6
(loss ~5.8), weights within 6e-8 with SGD. AdamW divides each element's step by the root of its squared gradients,
so an element whose gradient is small moves by up to ``lr`` whatever its size, and a rounding-order difference in
such a gradient reaches the weight amplified: within 1.1e-6 on one CPU, 1.55e-5 on another (one LoRA B element of
a gate projection; lr 1e-3). Limits ``LOSS_ATOL = 1e-5``, ``PARAM_ATOL`` 1e-5 with SGD and 5e-5 with AdamW; what
they catch: gradients averaged over the ranks instead of summed put the SGD losses 0.09 (DDP) and 0.5 (FSDP) off
and the AdamW weights 2e-4 off (measured by making that change); a per-rank loss-token count changes the loss in
the 2nd decimal.

The ranks run this file as a script (``python -m torch.distributed.run --nproc-per-node 2 test_ddp.py ...``): all
cases in one launch, ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.trainer.batches import IGNORE_INDEX
from kernels.trainer.config import MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.train import train

LOSS_ATOL = 1e-5
PARAM_ATOL = {"sgd": 1e-5, "adamw_torch": 5e-5}  # AdamW amplifies rounding in small gradients (docstring)
BOS, EOS, PAD = 256, 257, 258
WORLD = 2
MICRO, ACCUM, STEPS = 2, 2, 4
# (strategy, method, optimizer): DDP for adapters, FSDP2 for full fine-tuning and a sharded (4-bit) base. AdamW with
# clipping is blind to the scale of the gradients (Adam normalises it away, so does clipping above the norm): SGD
# without clipping is not, and catches gradients averaged over ranks where they must be summed
CASES = [("ddp", "lora", "adamw_torch"), ("ddp", "lora", "sgd"), ("ddp", "qlora", "adamw_torch"),
         ("fsdp", "full", "adamw_torch"), ("fsdp", "full", "sgd"), ("fsdp", "lora", "adamw_torch"),
         ("fsdp", "qlora", "adamw_torch")]
IDS = ["-".join(c) for c in CASES]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int) -> list[dict]:
    """Ragged rows like harness.inputs.data.tokenize_example: <bos> text <eos>, no loss on <bos>."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ids = [BOS] + [rng.randrange(97, 123) for _ in range(rng.randint(8, 30))] + [EOS]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return rows


def _settings(micro_batch: int, optimizer: str) -> TrainSettings:
    sgd = optimizer == "sgd"
    return TrainSettings(micro_batch=micro_batch, grad_accum=ACCUM, steps=STEPS, lr=0.5 if sgd else 1e-3,
                         optimizer=optimizer, max_grad_norm=None if sgd else 1.0, pad_id=PAD)


def _model(ckpt: str, method: str, device: str = "cpu"):  # noqa: ANN202
    opts = MethodOptions(kind=method, lora_r=4, lora_alpha=8)
    return load_model(ckpt, opts, dtype=torch.float32, device=device, seed=0)


def _trained(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The trainable parameters, whole (an FSDP DTensor gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def _rank_main(ckpt: str, out_dir: str, device: str) -> None:
    """One rank: every case of :data:`CASES` with micro-batch ``MICRO``, results saved per case (rank 0)."""
    import torch.distributed as dist

    from kernels.trainer.distributed import DataParallel

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rows = _rows(WORLD * MICRO * ACCUM * STEPS)
    for (strategy, method, optimizer), name in zip(CASES, IDS, strict=True):
        dp = DataParallel(strategy)
        model = dp.prepare(_model(ckpt, method, device))
        losses = train(model, rows, _settings(MICRO, optimizer), dist=dp)
        weights = _trained(model)
        with dp.whole_parameters(model):  # what the adapter saves from
            whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if dp.rank == 0:
            torch.save({"losses": losses, "weights": weights, "whole": whole, "effective": dp.effective(),
                        "settings": model.effective_settings()},
                       Path(out_dir) / f"{name}.pt")
    dist.destroy_process_group()


def _launch(ckpt: Path, out: Path, device: str) -> Path:
    """Every case trained by two processes (one launch): gloo on the CPU, NCCL on two GPUs."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                           __file__, str(ckpt), str(out), device], env=env, capture_output=True, text=True,
                          timeout=600)
    errors = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "Error" in ln]
    assert proc.returncode == 0, "\n".join(errors[-20:]) or proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_llama_fp32, tmp_path_factory) -> Path:  # noqa: ANN001
    return _launch(tiny_llama_fp32, tmp_path_factory.mktemp("ddp"), "cpu")


@pytest.mark.parametrize(("strategy", "method", "optimizer"), CASES, ids=IDS)
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, tiny_llama_fp32, strategy, method,  # noqa: ANN001
                                                         optimizer):
    _check_case(two_ranks, tiny_llama_fp32, strategy, method, optimizer, "cpu")


@pytest.mark.gpu
def test_two_gpus_equal_one_on_the_global_batch(tiny_llama_fp32, tmp_path):  # noqa: ANN001
    """The same on two GPUs (NCCL, the Triton kernels in fp32): `python -m pytest -q -m gpu tests/kernels/test_ddp.py`
    on a machine with 2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = _launch(tiny_llama_fp32, tmp_path, "cuda")
    for strategy, method, optimizer in CASES:
        _check_case(out, tiny_llama_fp32, strategy, method, optimizer, "cuda")


def _check_case(out: Path, ckpt, strategy: str, method: str, optimizer: str, device: str) -> None:  # noqa: ANN001
    got = torch.load(out / f"{strategy}-{method}-{optimizer}.pt", map_location="cpu")
    one = _model(str(ckpt), method, device)
    want_losses = train(one, _rows(WORLD * MICRO * ACCUM * STEPS), _settings(WORLD * MICRO, optimizer))
    want = {k: v.cpu() for k, v in _trained(one).items()}
    assert got["losses"] == pytest.approx(want_losses, abs=LOSS_ATOL), (got["losses"], want_losses)
    assert want_losses[-1] < want_losses[0] - 0.01  # it trained: equal non-learning would prove little
    assert set(got["weights"]) == set(want)
    for name, w in want.items():
        atol = PARAM_ATOL[optimizer]
        torch.testing.assert_close(got["weights"][name], w, atol=atol, rtol=0, msg=name)
        torch.testing.assert_close(got["whole"][name], w, atol=atol, rtol=0, msg=f"whole_parameters: {name}")
    assert got["effective"] == {"world_size": WORLD, "strategy": strategy}
    settings = one.effective_settings()
    for key in ("trainable_params", "total_params", "quantization", "lora_r"):  # sharding hides nothing
        assert got["settings"].get(key) == settings.get(key), key


def test_a_rank_short_of_micro_batches_runs_an_empty_one():
    from kernels.trainer.distributed import DataParallel

    dp = DataParallel.__new__(DataParallel)  # the data split alone: no process group needed
    dp.rank, dp.world_size, dp.strategy = 1, 2, "ddp"
    s = TrainSettings(micro_batch=2, grad_accum=2, steps=1, pad_id=PAD)
    rows = _rows(10)  # 5 micro-batches: ranks get 0, 2, 4 and 1, 3 in the first step
    first = dp.micro_batches(rows, s, 0, "cpu")
    assert [b["input_ids"].shape[0] for b in first] == [2, 2]
    second = dp.micro_batches(rows, s, 1, "cpu")  # step 2 (epoch 1's end): rank 0 has micro-batch 4, rank 1 none
    assert len(second) == 1 and int(second[0]["attention_mask"].sum()) == 0
    assert bool((second[0]["labels"] == IGNORE_INDEX).all())


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
    print(json.dumps({"rank_done": os.environ.get("RANK")}))
