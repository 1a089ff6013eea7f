"""Norm outputs and the gated MLP activation remade in backward (kernels/trainer/remake.py): the same loss and
gradients as keeping them, on every family's block shape, with and without recomputation; and the tensors remade
are exactly the two norm outputs and the activation, no longer among what autograd keeps."""

from __future__ import annotations

import pytest
import torch

from kernels.trainer import model as model_mod
from kernels.trainer.config import MethodOptions
from kernels.trainer.loading import load_model
from kernels.trainer.remake import RemadeSaves
from tests.kernels.checkpoints import preset_checkpoints

PRESETS = ("tiny-llama", "tiny-gemma2", "tiny-phi3", "tiny-mixtral")  # plain, sandwich + GeGLU, fused gate_up, MoE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):  # noqa: ANN001, ANN201
    with preset_checkpoints(tmp_path_factory.mktemp("remake"), PRESETS) as found:
        yield found


def _ids(shape=(2, 23)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(4))


def _grads(ckpt, kind: str, checkpointing: bool, **knobs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001, ANN003
    """Loss and gradients of one step of a LoRA (non-zero B) or full model with trainer ``knobs`` set."""
    opts = MethodOptions(kind=kind, lora_r=4, gradient_checkpointing=checkpointing,
                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj", "qkv_proj", "gate_up_proj"), **knobs)
    model = load_model(ckpt, opts, dtype=torch.float32, device="cpu", seed=0)
    for _, mod in model.linears():  # non-zero B so every LoRA parameter gets a gradient
        if getattr(mod, "lora_B", None) is not None:
            torch.nn.init.normal_(mod.lora_B, std=0.02, generator=torch.Generator().manual_seed(5))
    ids = _ids()
    loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("kind", "checkpointing"), [("lora", False), ("lora", True), ("full", False)])
def test_remade_activations_give_the_same_loss_and_gradients(checkpoints, preset, kind, checkpointing):  # noqa: ANN001
    if kind == "full" and preset != "tiny-llama":
        pytest.skip("full fine-tuning: one family is enough (the same saves as LoRA's, plus dW's)")
    if preset == "tiny-mixtral" and kind == "lora":
        pytest.skip("LoRA on Mixtral's experts is not built; its attention LoRA is covered by the full row")
    kept_loss, kept = _grads(checkpoints[preset], kind, checkpointing, remake_activations=False)
    loss, remade = _grads(checkpoints[preset], kind, checkpointing, remake_activations=True)
    assert torch.equal(loss, kept_loss)
    assert remade.keys() == kept.keys() and kept
    for n, g in remade.items():  # the same op on the same kept inputs: bitwise the forward's tensors
        assert torch.equal(g, kept[n]), n


class _Counting(RemadeSaves):
    """RemadeSaves that also counts, per storage, the bytes autograd kept as tensors and those it got as recipes."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.saved: dict[int, int] = {}
        self.remade: dict[int, int] = {}

    def _pack(self, t: torch.Tensor):  # noqa: ANN202
        packed = super()._pack(t)
        (self.saved if packed is t else self.remade)[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return packed

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    @property
    def remade_bytes(self) -> int:
        return sum(self.remade.values())


def _count_saves(monkeypatch) -> list[_Counting]:  # noqa: ANN001
    """Every layer forward's saves from now on, in order (the saved and remade storages they saw)."""
    made: list[_Counting] = []

    class Recording(_Counting):
        def __enter__(self) -> _Counting:
            made.append(self)
            return super().__enter__()

    monkeypatch.setattr(model_mod, "RemadeSaves", Recording)
    return made


def test_what_a_kept_layer_no_longer_keeps(checkpoints, monkeypatch):  # noqa: ANN001
    made = _count_saves(monkeypatch)
    model = load_model(checkpoints["tiny-llama"], MethodOptions(kind="lora", lora_r=4, gradient_checkpointing=False),
                       dtype=torch.float32, device="cpu", seed=0)
    cfg = model.cfg
    ids = _ids()
    model(ids, labels=ids)
    assert len(made) == cfg.num_layers
    tokens, width = ids.numel(), 2 * cfg.hidden_size + cfg.intermediate_size  # two norm outputs + SwiGLU's output
    for saves in made:
        assert saves.remade_bytes == tokens * width * 4  # fp32
        assert not saves.remade.keys() & saves.saved.keys()  # no one keeps them as tensors
        assert saves.saved_bytes > 0


def test_nothing_is_remade_when_switched_off_or_without_grad(checkpoints):  # noqa: ANN001
    x = torch.randn(4, 8, requires_grad=True)
    with _Counting(False) as off:
        y = off.remake(x * 2, lambda: x * 2)
        (y * y).sum().backward()
    assert not off.remade and not off.saved
    with torch.no_grad(), _Counting(True) as nograd:
        nograd.remake(x * 2, lambda: x * 2)
    assert not nograd.remade


@pytest.mark.parametrize(("preset", "kind", "checkpointing"), [
    ("tiny-llama", "lora", False), ("tiny-llama", "lora", True), ("tiny-llama", "full", True),
    ("tiny-gemma2", "lora", True),  # sandwich norms and GeGLU
])
def test_the_mlp_over_token_chunks_gives_the_same_gradients(checkpoints, preset, kind, checkpointing):  # noqa: ANN001
    """mlp_chunk_tokens: the MLP of 46 tokens in chunks of 10 (the last one short) == over all of them; the first
    layer's MLP LoRA gets its gradient although its input (a frozen embedding's norm) needs none."""
    ref_loss, ref = _grads(checkpoints[preset], kind, checkpointing)
    loss, tiled = _grads(checkpoints[preset], kind, checkpointing, mlp_chunk_tokens=10)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert tiled.keys() == ref.keys()
    for n, g in tiled.items():  # the same sums in other groupings (the LoRA dA over chunks): not bitwise
        torch.testing.assert_close(g, ref[n], atol=1e-6, rtol=1e-4, msg=n)
    if kind == "lora":
        assert tiled["model.layers.0.mlp.down_proj.lora_A"].abs().sum() > 0


def test_the_tiled_mlp_keeps_its_input_only(checkpoints, monkeypatch):  # noqa: ANN001
    made = _count_saves(monkeypatch)
    kept = {}
    for chunk in (None, 8):
        made.clear()
        opts = MethodOptions(kind="lora", lora_r=4, gradient_checkpointing=False, mlp_chunk_tokens=chunk)
        model = load_model(checkpoints["tiny-llama"], opts, dtype=torch.float32, device="cpu", seed=0)
        ids = _ids()
        model(ids, labels=ids)
        kept[chunk] = made[0].saved_bytes
    # gate and up (2 x intermediate wide) per token are no longer kept; the input was a remade norm output already
    cfg = model.cfg
    assert kept[None] - kept[8] >= _ids().numel() * 2 * cfg.intermediate_size * 4


def test_the_tiled_mlp_runs_in_chunks_without_a_graph_too(checkpoints):  # noqa: ANN001
    """The forward of a layer that recomputes in backward runs without a graph: there too the MLP sees a chunk of
    rows at a time (untiled, that forward alone held gate, up and the activation for every token: at long context
    more than the tiled layer's backward, which the planner's model counts), with the untiled MLP's output."""
    opts = MethodOptions(kind="lora", lora_r=4, gradient_checkpointing=True, mlp_chunk_tokens=8)
    model = load_model(checkpoints["tiny-llama"], opts, dtype=torch.float32, device="cpu", seed=0)
    mlp = model.model.layers[0].mlp
    rows = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    x = torch.randn(2, 23, model.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    try:
        with torch.no_grad():
            got = model_mod.tiled_mlp(mlp, x, 8)
    finally:
        hook.remove()
    assert rows == [8] * 5 + [6]  # 46 rows
    with torch.no_grad():
        torch.testing.assert_close(got, mlp(x), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("graph", [False, True])
def test_remade_activations_train_the_same_on_the_gpu(checkpoints, graph, kind):  # noqa: ANN001
    """bf16 on CUDA through the Triton ops (and the whole step as one CUDA graph, replayed): remaking in backward runs
    the same kernels on the same inputs, so four optimizer steps give the kept run's losses and weights, bit for bit;
    likewise the kept layer that also remakes its MLP's gate and up (the grouped, NF4 projection again)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import random

    from kernels.trainer.batches import IGNORE_INDEX
    from kernels.trainer.config import TrainSettings
    from kernels.trainer.train import train

    rng = random.Random(0)
    rows = []
    for _ in range(16):
        ids = [256] + [rng.randrange(97, 123) for _ in range(40)] + [257]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    out = {}
    variants = {"kept": {"remake_activations": False}, "remade": {}, "mlp": {"remake_mlp_layers": -1}}
    for name, knobs in variants.items():
        torch.manual_seed(0)
        opts = MethodOptions(kind=kind, lora_r=8, recompute_layers=1, cuda_graph=graph, **knobs)
        model = load_model(checkpoints["tiny-llama"], opts, dtype=torch.bfloat16, device="cuda", seed=0)
        s = TrainSettings(micro_batch=2, grad_accum=2, steps=4, lr=1e-3, pad_id=258)
        losses = train(model, rows, s, device=torch.device("cuda"))
        assert [i for i, layer in enumerate(model.model.layers) if layer.remake_mlp] == ([1] if name == "mlp" else [])
        out[name] = losses, {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for name in ("remade", "mlp"):
        assert out[name][0] == out["kept"][0], name
        for n, p in out[name][1].items():
            assert torch.equal(p, out["kept"][1][n]), (name, n)


@pytest.mark.parametrize(("preset", "kind", "checkpointing"), [
    ("tiny-llama", "lora", False), ("tiny-llama", "lora", True), ("tiny-llama", "full", False),
    ("tiny-gemma2", "lora", False),  # sandwich norms and GeGLU
    ("tiny-phi3", "lora", True),  # one fused gate_up projection, gate and up slices of it
])
def test_remade_mlp_projections_give_the_same_loss_and_gradients(checkpoints, preset, kind, checkpointing):  # noqa: ANN001
    """remake_mlp_layers: gate and up made again in backward by the same projection of the same (remade) input are
    bitwise the forward's, so loss and every gradient equal keeping them; with checkpointing, one layer recomputes
    and the kept ones remake."""
    knobs = {"recompute_layers": 1} if checkpointing else {}
    kept_loss, kept = _grads(checkpoints[preset], kind, checkpointing, **knobs)
    loss, remade = _grads(checkpoints[preset], kind, checkpointing, remake_mlp_layers=-1, **knobs)
    assert torch.equal(loss, kept_loss)
    assert remade.keys() == kept.keys() and kept
    for n, g in remade.items():
        assert torch.equal(g, kept[n]), n


def test_remade_mlp_layers_keep_neither_gate_nor_up(checkpoints, monkeypatch):  # noqa: ANN001
    """Of three layers, one recomputes (its forward saves nothing until backward); of the two kept, the first remakes
    gate and up (remake_mlp_layers: 1): 2 x intermediate widths per token fewer kept bytes there, none elsewhere."""
    made = _count_saves(monkeypatch)
    ids = _ids()
    kept = {}
    for count in (0, 1):
        made.clear()
        opts = MethodOptions(kind="lora", lora_r=4, recompute_layers=1, remake_mlp_layers=count)
        model = load_model(checkpoints["tiny-llama"], opts, dtype=torch.float32, device="cpu", seed=0)
        model(ids, labels=ids)
        kept[count] = {i: s.saved_bytes for i, s in enumerate(made) if s.saved_bytes}
        layers = [i for i, layer in enumerate(model.model.layers) if layer.remake_mlp]
        assert layers == ([] if count == 0 else [min(set(range(model.cfg.num_layers)) - model.checkpointed_layers)])
    cfg = model.cfg
    assert cfg.num_layers >= 2 and kept[0].keys() == kept[1].keys() and len(kept[0]) == cfg.num_layers - 1
    first, *rest = sorted(kept[0])
    assert kept[0][first] - kept[1][first] == ids.numel() * 2 * cfg.intermediate_size * 4  # fp32 gate and up
    assert all(kept[0][i] == kept[1][i] for i in rest)


@pytest.mark.parametrize(("preset", "knobs", "why"), [
    ("tiny-llama", {"lora_dropout": 0.1}, "lora_dropout 0"),
    ("tiny-llama", {"remake_activations": False}, "remake_activations"),
    ("tiny-llama", {"mlp_chunk_tokens": 8}, "mlp_chunk_tokens"),
    ("tiny-mixtral", {"target_modules": ("q_proj",)}, "a mixture of experts"),
    ("tiny-llama", {"remake_mlp_layers": -2}, "-1 \\(all kept layers\\) or >= 0"),
])
def test_remade_mlp_layers_refuses_what_it_cannot_remake(checkpoints, preset, knobs, why):  # noqa: ANN001
    opts = MethodOptions(kind="lora", lora_r=4, gradient_checkpointing=False, **{"remake_mlp_layers": -1, **knobs})
    with pytest.raises(ValueError, match=why):
        load_model(checkpoints[preset], opts, dtype=torch.float32, device="cpu", seed=0)


def test_a_remaking_layer_projects_gate_and_up_once_more_in_backward_and_lets_them_go(checkpoints, monkeypatch):  # noqa: ANN001
    """The pair SwiGLU and down_proj's backward need is made once (not once per tensor that needs it), and dropped
    after SwiGLU's backward has taken both: one gate/up projection per remaking layer in forward, one in backward."""
    from kernels.trainer.remake import Shared

    calls, pairs = [], []
    real_gate_up, real_init = model_mod.MLP._gate_up, Shared.__init__

    def counted(self, x):  # noqa: ANN001, ANN202
        calls.append(torch.is_grad_enabled())
        return real_gate_up(self, x)

    def kept_track(self, make, takers):  # noqa: ANN001, ANN202
        real_init(self, make, takers)
        pairs.append(self)

    monkeypatch.setattr(model_mod.MLP, "_gate_up", counted)
    monkeypatch.setattr(Shared, "__init__", kept_track)
    opts = MethodOptions(kind="lora", lora_r=4, gradient_checkpointing=False, remake_mlp_layers=1)
    model = load_model(checkpoints["tiny-llama"], opts, dtype=torch.float32, device="cpu", seed=0)
    ids = _ids()
    loss = model(ids, labels=ids)
    layers = model.cfg.num_layers
    assert calls == [True] * layers and len(pairs) == 1  # forward: every layer's MLP once, one pair registered
    loss.backward()
    assert calls == [True] * layers + [False]  # backward: the remaking layer's projection once more, without a graph
    assert pairs[0]._value is None  # dropped once SwiGLU's backward took gate and up
