"""What the trainer saves loads in plain transformers + PEFT and computes what our model computes.

Tolerance: float32 on CPU; after loading, both sides evaluate the same weights with the same float32 maths in
a different operation order, so logits (magnitude ~1) agree to a few ulps: ``atol = 1e-5`` (measured < 1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels.trainer.config import MethodOptions, TrainSettings
from kernels.trainer.loading import load_model
from kernels.trainer.save import load_peft_state_dict, peft_state_dict, save_trained
from kernels.trainer.train import train
from tests.kernels.checkpoints import byte_rows

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):  # noqa: ANN001, ANN201
    from harness.inputs.models import get_preset, prepare_random_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEBENCH_CACHE", str(tmp_path_factory.mktemp("save_cache")))
        yield {p: prepare_random_checkpoint(get_preset(p), "float32", 0) for p in ("tiny-llama", "tiny-qwen2")}


def _trained(ckpt, kind: str):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = load_model(ckpt, MethodOptions(kind=kind, lora_r=4, lora_alpha=8), dtype=torch.float32, device="cpu")
    # lr 1e-2 for a few steps: LoRA B and DoRA magnitudes move far from their init, so a mis-mapped key shows
    train(model, byte_rows(), TrainSettings(micro_batch=2, grad_accum=1, steps=3, lr=1e-2, pad_id=258))
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("preset", "kind"), [("tiny-llama", "lora"), ("tiny-qwen2", "lora"), ("tiny-llama", "dora")])
def test_peft_adapter_loads_and_matches(ckpts, tmp_path, preset, kind):  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = ckpts[preset]
    ours = _trained(ckpt, kind)
    assert any(float(m.lora_B.abs().max()) > 0 for _, m in ours.linears() if m.lora_B is not None)
    assert save_trained(ours, tmp_path, ckpt) == "peft adapter"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_dora"] == (kind == "dora")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                           str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_qlora_adapter_is_a_plain_lora_adapter(ckpts, tmp_path):  # noqa: ANN001
    """QLoRA saves the LoRA adapter only (base = the original checkpoint); it loads back into our model too."""
    from safetensors.torch import load_file

    ckpt = ckpts["tiny-llama"]
    ours = _trained(ckpt, "qlora")
    save_trained(ours, tmp_path, ckpt)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(sd) == set(peft_state_dict(ours))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in sd)
    torch.manual_seed(5)
    again = load_model(ckpt, MethodOptions(kind="qlora", lora_r=4, lora_alpha=8), dtype=torch.float32,
                       device="cpu").eval()
    load_peft_state_dict(again, sd)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_full_checkpoint_loads_in_transformers(ckpts, tmp_path, preset):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    ckpt = ckpts[preset]
    ours = _trained(ckpt, "full")
    assert save_trained(ours, tmp_path, ckpt) == "hf checkpoint"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
        assert not torch.allclose(base(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-3)  # it trained
