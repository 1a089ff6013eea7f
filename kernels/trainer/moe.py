"""Mixtral's and Qwen3-MoE's sparse mixture-of-experts block, and the reading of its expert weights from a checkpoint.

Module and tensor names are transformers 5's (``model.layers.N.mlp.gate.weight`` ``[E, H]``,
``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``), so a full checkpoint we
save loads in transformers as it is; checkpoints in the original per-expert layout
(Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3.weight``, Qwen3-MoE's ``mlp.experts.N.gate_proj/up_proj/
down_proj.weight``: what transformers itself still writes) are stacked as they are read (:class:`ExpertStacker`).

The experts are 3-D tensors, not linear modules: PEFT's ``all-linear`` leaves them (and the router) out, so LoRA
trains the attention projections here too; full fine-tuning trains experts and router.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.trainer.config import DecoderConfig
from kernels.trainer.opset import FUSED_OPS

_LEGACY = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])\.weight|gate\.weight)$")
# Qwen3-MoE's per-expert names (its router is already mlp.gate.weight), as Mixtral's w1 (gate), w3 (up), w2 (down)
_LEGACY_QWEN = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_QWEN_AS_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class Router(nn.Module):
    """Top-k router: softmax over the experts in fp32, the top-k probabilities renormalised to sum to 1 (Mixtral;
    Qwen3-MoE where its ``norm_topk_prob`` says so)."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.top_k, self.renormalise = cfg.experts_per_token, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, H]`` in; ``([T, k]`` fp32 weights, ``[T, k]`` expert ids``)``."""
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        return (top_w / top_w.sum(dim=-1, keepdim=True) if self.renormalise else top_w), top_i


def grouped_mm_ok(x: torch.Tensor, inter: int) -> bool:
    """Whether ``torch._grouped_mm`` runs the experts here: this torch has it, on the CPU or in bf16 on a Hopper or
    newer GPU (its CUDA kernel's condition), with rows of 16-byte multiples (its stride condition)."""
    if not hasattr(torch, "_grouped_mm") or (x.shape[-1] * x.element_size()) % 16 or (inter * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return True
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


class Experts(nn.Module):
    """The experts' SwiGLU MLPs as stacked weights: ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first),
    ``down_proj`` ``[E, H, I]``.

    Two paths, the same function: grouped GEMMs (``torch._grouped_mm``: the routed tokens sorted by expert, one
    GEMM launch for all experts' gate/up and one for down, no host sync) where :func:`grouped_mm_ok`, else a loop
    over the experts (``grouped = False`` forces it).
    """

    ops = FUSED_OPS
    grouped = True

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts, self.intermediate = e, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Each expert on its routed tokens, weighted by the router and summed per token: ``[T, H]`` in and out.
        Each token's contributions are added in ascending expert order on both paths, as transformers adds them."""
        if self.grouped and grouped_mm_ok(x, self.intermediate):
            return self._grouped(x, top_w, top_i)
        return self._loop(x, top_w, top_i)

    def _grouped(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """One gather, two grouped GEMMs, one scatter-add: ``T * k`` rows sorted by expert (stable, so by token
        within an expert), group ends counted on the device."""
        k = top_i.shape[1]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok, slot = order // k, order % k
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)
        gate_up = torch._grouped_mm(x.index_select(0, tok), self.gate_up_proj.transpose(-2, -1), offs=offs)
        act = self.ops.swiglu(gate_up[:, :self.intermediate], gate_up[:, self.intermediate:])
        y = torch._grouped_mm(act, self.down_proj.transpose(-2, -1), offs=offs) * top_w[tok, slot, None]
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))

    def _loop(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """A loop over the experts with gathered tokens (index_select / index_add), as transformers' eager path: a
        GEMM pair per expert and a host sync per expert to size it."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            slot, tok = torch.where((top_i == e).t())
            if tok.numel() == 0:
                continue
            gate_up = F.linear(x.index_select(0, tok), self.gate_up_proj[e])
            act = self.ops.swiglu(gate_up[:, :self.intermediate], gate_up[:, self.intermediate:])
            y = F.linear(act, self.down_proj[e]) * top_w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """The sparse block: router (``gate``) then the routed experts (``experts``)."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate = Router(cfg, dtype, device)
        self.experts = Experts(cfg, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` in and out: each token through its top-k experts, weighted by the router."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_w, top_i = self.gate(flat)
        return self.experts(flat, top_w, top_i).view(shape)


class ExpertStacker:
    """Reads original-layout expert tensors (Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2.weight`` and
    ``block_sparse_moe.gate.weight``, Qwen3-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj.weight``) into the
    stacked parameters as they arrive from the checkpoint files."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slices: dict[str, int] = {}  # parameter name -> slices read into it

    def take(self, key: str, read: Callable[[], torch.Tensor]) -> str | None:
        """Copy the tensor ``read()`` of a legacy ``key`` into place; returns the parameter name it filled (None:
        not a legacy MoE key, nothing read)."""
        m = _LEGACY.match(key)
        if m is not None:
            layer, expert, which = m.groups()
        elif (q := _LEGACY_QWEN.match(key)) is not None:
            layer, expert, which = q.group(1), q.group(2), _QWEN_AS_W[q.group(3)]
        else:
            return None
        moe = self.model.get_submodule(f"{layer}.mlp")
        if expert is None:
            _fill(moe.gate, "weight", None, read())
            name = f"{layer}.mlp.gate.weight"
        elif which == "w2":
            _fill(moe.experts, "down_proj", (int(expert),), read())
            name = f"{layer}.mlp.experts.down_proj"
        else:
            inter = moe.experts.intermediate
            rows = slice(0, inter) if which == "w1" else slice(inter, 2 * inter)  # w1: gate, w3: up
            _fill(moe.experts, "gate_up_proj", (int(expert), rows), read())
            name = f"{layer}.mlp.experts.gate_up_proj"
        self.slices[name] = self.slices.get(name, 0) + 1
        return name

    def incomplete(self) -> list[str]:
        """Stacked parameters some of whose experts' tensors never arrived (their memory is uninitialised)."""
        per_expert = {"weight": 0, "gate_up_proj": 2, "down_proj": 1}  # the router's weight is one tensor
        n = self.model.cfg.num_experts
        return sorted(name for name, k in self.slices.items() if k < per_expert[name.rsplit(".", 1)[-1]] * n)


def _fill(mod: nn.Module, leaf: str, index: tuple | None, t: torch.Tensor) -> None:
    """Copy ``t`` into ``mod.<leaf>[index]``, first allocating the parameter on ``t``'s device when it is still
    on the meta device (the model is built there)."""
    p = getattr(mod, leaf)
    if p.device.type == "meta":
        p = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=t.device), requires_grad=False)
        setattr(mod, leaf, p)
    with torch.no_grad():
        if index is None:
            p.copy_(t)
        else:
            p[index].copy_(t)
