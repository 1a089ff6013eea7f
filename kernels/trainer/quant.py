"""NF4 storage for frozen QLoRA base weights, and the bridge to ``kernels.ops`` for the 4-bit ops.

Format (same layout as bitsandbytes' NF4, so the memory is the same): the weight is flattened, cut into blocks
of 64 values, each block scaled by its absmax into [-1, 1] and every value replaced by the index of the nearest of
the 16 NF4 levels; two 4-bit codes per byte (first value in the high nibble). With double quantisation the fp32
absmaxes are themselves stored as uint8: minus their mean, in blocks of 256 with one fp32 scale per block
(linear int8 here; bitsandbytes uses its 8-bit dynamic map, so dequantised weights differ from bnb's by that
second-level rounding only, < 0.4 % of a block's scale).

Bytes per weight: 0.5 (codes) + 4/64 (absmax) = 0.5625, or 0.5 + 1/64 + 4/(64 * 256) ~= 0.516 with double quant.

While ``kernels.ops`` has no NF4 op these functions are plain torch; :class:`NF4Linear` re-dequantises in backward
instead of saving the bf16 weight (bitsandbytes does the same), so a layer's 4-bit weights never sit in memory
twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The 16 NF4 levels (QLoRA paper, appendix E; identical to bitsandbytes' table).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
BLOCK = 64
ABSMAX_BLOCK = 256
_ROWS_PER_CHUNK = 1024  # dequantise in row chunks: bounds the int32 index temp to ~1024 x in_features / 2 x 4 bytes


@dataclass
class NF4Weight:
    """A frozen weight stored in NF4 (see module docstring); ``dequantize()`` returns it in ``dtype``."""

    packed: torch.Tensor  # uint8 [numel / 2]
    absmax: torch.Tensor  # fp32 [numel / 64], or uint8 with double quant
    absmax_scale: torch.Tensor | None  # fp32 [ceil(blocks / 256)] (double quant)
    absmax_offset: torch.Tensor | None  # fp32 scalar (double quant)
    shape: tuple[int, int]
    dtype: torch.dtype  # compute dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def nbytes(self) -> int:
        ts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def numel_stored(self) -> int:
        """Elements as stored (packed bytes count once), like bitsandbytes' Params4bit in ``parameters()``."""
        return self.packed.numel()

    def block_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        n = self.absmax.numel()
        q = self.absmax.float() - 127.0
        scale = self.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[:n]
        return q * scale + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize(self)

    def to(self, device: torch.device | str) -> NF4Weight:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Weight(mv(self.packed), mv(self.absmax), mv(self.absmax_scale), mv(self.absmax_offset), self.shape,
                         self.dtype)


def nf4_quantize(w: torch.Tensor, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> NF4Weight:
    """Quantise a 2-D weight (numel divisible by 64) to NF4 on its own device."""
    out_f, in_f = w.shape
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs numel divisible by {BLOCK}, got {tuple(w.shape)}")
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
    mids = (levels[1:] + levels[:-1]) / 2  # nearest level == bucketize against the midpoints
    blocks = w.reshape(-1, BLOCK)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=w.device)
    step = 1 << 16  # blocks per chunk: bounds the fp32 temporaries at 16 MB
    for s in range(0, blocks.shape[0], step):
        b = blocks[s:s + step].float()
        am = b.abs().amax(1).clamp_min(1e-12)
        absmax[s:s + step] = am
        codes[s:s + step] = torch.bucketize(b / am[:, None], mids).to(torch.uint8)
    codes = codes.reshape(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        pad = (-centred.numel()) % ABSMAX_BLOCK
        cb = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
        scale = (cb.abs().amax(1) / 127.0).clamp_min(1e-12)
        q = torch.round(cb / scale[:, None]).clamp(-127, 127) + 127.0
        absmax_store = q.reshape(-1)[: centred.numel()].to(torch.uint8)
    else:
        absmax_store = absmax
    return NF4Weight(packed.contiguous(), absmax_store, scale, offset, (out_f, in_f), compute_dtype)


def nf4_dequantize(q: NF4Weight) -> torch.Tensor:
    """Dequantise to ``q.dtype``; works in row chunks to bound temporaries."""
    out_f, in_f = q.shape
    dev = q.packed.device
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=dev)
    # one lookup per byte: [256, 2] table of (high nibble level, low nibble level)
    pair = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).to(q.dtype)
    absmax = q.block_absmax()
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    flat = out.view(-1)
    per_chunk = _ROWS_PER_CHUNK * in_f  # elements; a multiple of 64 whenever in_f is (all model shapes)
    per_chunk -= per_chunk % BLOCK
    per_chunk = max(per_chunk, BLOCK)
    for s in range(0, flat.numel(), per_chunk):
        e = min(s + per_chunk, flat.numel())
        vals = pair[q.packed[s // 2:e // 2].int()].reshape(-1, BLOCK)
        vals *= absmax[s // BLOCK:e // BLOCK, None].to(q.dtype)
        flat[s:e] = vals.reshape(-1)
    return out


def ops_nf4():
    """The ``kernels.ops.nf4`` module when it exists (the ops engineer's Triton NF4), else None."""
    try:
        from kernels.ops import nf4  # noqa: F401 - optional, lands separately
    except ImportError:
        return None
    return nf4


class NF4LinearFunction(torch.autograd.Function):
    """``x @ dequant(q).T (+ bias)`` saving only the 4-bit weight: backward dequantises again for dX."""

    @staticmethod
    def forward(ctx, x, q, bias):  # noqa: ANN001, ANN205
        w = q.dequantize()
        ctx.q = q
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        w = ctx.q.dequantize()
        return gy @ w, None, None


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Frozen NF4 linear layer (bias, if any, is frozen too)."""
    return NF4LinearFunction.apply(x, q, bias)
