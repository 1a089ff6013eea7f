"""4-bit NormalFloat (NF4) weight quantisation as in QLoRA / bitsandbytes, with double quantisation.

Format (identical to bitsandbytes ``quantize_4bit(quant_type="nf4", compress_statistics=True)``, so the
tensors of a bnb-quantised checkpoint can be wrapped without re-quantising, see :meth:`NF4Tensor.from_bnb`):

* The weight ``[out, in]`` is flattened row-major and cut into blocks of ``blocksize = 64`` values.
* Each block stores ``absmax`` (max |w| of the block); each value stores the index (0..15) of the nearest
  entry of the 16-value NF4 code book :data:`NF4_CODE` to ``w / absmax`` (ties go to the lower entry, as in
  bnb's ``dQuantizeNF4`` decision tree whose thresholds are the mid-points between code values).
* Packing: two 4-bit indices per ``uint8``, element ``2i`` in the **high** nibble and ``2i + 1`` in the low
  nibble; ``packed`` has shape ``[ceil(n / 2), 1]`` (bnb's layout; an odd tail is padded with index 0).
* Double quantisation of the fp32 absmax vector: ``offset = absmax.mean()``; ``absmax - offset`` is cut into
  blocks of 256, each stores ``absmax_scale`` (its max |.|, fp32) and per entry an 8-bit index into bnb's
  signed dynamic-exponent code :func:`create_dynamic_map` (256 values in [-1, 1]).
  Decoding: ``absmax = absmax_code[absmax_q] * absmax_scale[block // 256] + offset``.
  ``absmax_q`` is the exact nearest code; bitsandbytes' binary search (CPU build, checked in the tests) sometimes
  takes its neighbour, so a bnb-quantised weight can differ from ours in a rare 8-bit absmax index (one block's
  scale, < 1e-4 relative) while every 4-bit nibble is the same.
  bnb names: ``quant_state.absmax`` = our ``absmax_q``, ``quant_state.offset``, ``state2.absmax`` =
  ``absmax_scale``, ``state2.code`` = ``absmax_code``, ``quant_state.code`` = :data:`NF4_CODE`.

Storage: 0.5 byte per weight + 1 byte per 64 (absmax_q) + 4 bytes per 16384 = 4.127 bits per weight.

Dequantisation error bound (tested): for a value ``w`` in a block with true ``absmax`` and decoded
``absmax_hat``, with ``c`` its code index,
``|w - NF4[c] * absmax_hat| <= g(c) * absmax + |NF4[c]| * |absmax - absmax_hat|``, where ``g(c)`` is half of the
larger gap between ``NF4[c]`` and its neighbours; and ``|absmax - absmax_hat| <= g2(q) * absmax_scale`` with
``g2`` the same half-gap in the dynamic code. (Plus fp32 rounding, and one rounding to the output dtype.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace as NS

import torch
import triton
import triton.language as tl

from kernels.ops._utils import runnable, use_triton

# bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_BLOCK_BYTES = 1024  # packed bytes per program of the flat (fallback) kernel -> 2048 outputs

# Launch settings of the blocked kernel; keyword arguments of dequantize_nf4_forward (and the environment variable
# TUNEBENCH_NF4_DEQUANT) override them. rows: quant blocks of 64 values per program (scaled to keep the bytes per
# program for other blocksizes); lookup: 0 = gather from the 16-entry table in L1, 1 = select tree in registers,
# 2 = tl.gather from the table held in registers; flat: the per-byte kernel instead (non-power-of-two blocksizes
# always use it).
# Measured (H100, results/trainer_profile_h100-20261123/bench_nf4.md; all 13 variants): rows 64, 4 warps,
# L1 gather is the fastest at 14336 x 4096: 0.058 ms against the flat kernel's 0.121 ms (2.1x; rows 32 within 1 %);
# the fast-graph QLoRA step takes 281 ms with it, 295 ms with the flat kernel.
DEQUANT_DEFAULTS = {"flat": False, "rows": 64, "num_warps": 4, "lookup": 0}


def _env_dequant_settings() -> dict:
    """Overrides of :data:`DEQUANT_DEFAULTS` from ``TUNEBENCH_NF4_DEQUANT`` (a JSON object), so an A/B run of a
    whole trainer step or sweep (its subprocesses inherit the environment) needs no code change."""
    raw = os.environ.get("TUNEBENCH_NF4_DEQUANT", "").strip()
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TUNEBENCH_NF4_DEQUANT: not JSON ({e}): {raw!r}") from None
    if not isinstance(cfg, dict) or set(cfg) - set(DEQUANT_DEFAULTS):
        raise ValueError(f"TUNEBENCH_NF4_DEQUANT: expected a JSON object with keys from {sorted(DEQUANT_DEFAULTS)}, "
                         f"got {raw!r}")
    return cfg


DEQUANT_DEFAULTS |= _env_dequant_settings()


@triton.jit
def _absmax(blk, mask, absmax_ptr, absmax_q_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, absmax_blocksize,
            DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of quant blocks ``blk``: stored, or decoded from its 8-bit index (double quantisation)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_q_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + blk // absmax_blocksize, mask=mask, other=0.0)
        return tl.load(absmax_code_ptr + q) * scale + tl.load(offset_ptr)
    return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    offset_ptr,
    out_ptr,
    n_elements,
    blocksize,
    absmax_blocksize,
    DOUBLE_QUANT: tl.constexpr,  # a flag: decode absmax in-kernel from its 8-bit indices
    BLOCK: tl.constexpr,
):
    byte_offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    elem0 = byte_offs * 2
    byte_mask = elem0 < n_elements
    byte = tl.load(packed_ptr + byte_offs, mask=byte_mask, other=0).to(tl.int32)
    v_hi = tl.load(code_ptr + ((byte >> 4) & 15))  # 16-entry table: stays in L1
    v_lo = tl.load(code_ptr + (byte & 15))
    # blocksize is even, so both values of a byte share one absmax.
    blk = elem0 // blocksize
    absmax = _absmax(blk, byte_mask, absmax_ptr, absmax_q_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
                     absmax_blocksize, DOUBLE_QUANT)
    # Interleave (hi, lo) -> consecutive elements so the store is one contiguous, coalesced 2*BLOCK run.
    vals = tl.join(v_hi * absmax, v_lo * absmax).reshape([2 * BLOCK])
    out_offs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_elements)


@triton.jit
def _code_select(idx, code_ptr):
    """``code[idx]`` without a memory gather: 16 scalars in registers and a 4-level select tree (15 selects)."""
    b0, b1, b2, b3 = (idx & 1) != 0, (idx & 2) != 0, (idx & 4) != 0, (idx & 8) != 0
    c = code_ptr
    p0 = tl.where(b0, tl.load(c + 1), tl.load(c + 0))
    p1 = tl.where(b0, tl.load(c + 3), tl.load(c + 2))
    p2 = tl.where(b0, tl.load(c + 5), tl.load(c + 4))
    p3 = tl.where(b0, tl.load(c + 7), tl.load(c + 6))
    p4 = tl.where(b0, tl.load(c + 9), tl.load(c + 8))
    p5 = tl.where(b0, tl.load(c + 11), tl.load(c + 10))
    p6 = tl.where(b0, tl.load(c + 13), tl.load(c + 12))
    p7 = tl.where(b0, tl.load(c + 15), tl.load(c + 14))
    q0, q1, q2, q3 = tl.where(b1, p1, p0), tl.where(b1, p3, p2), tl.where(b1, p5, p4), tl.where(b1, p7, p6)
    return tl.where(b3, tl.where(b2, q3, q2), tl.where(b2, q1, q0))


@triton.jit
def _nf4_dequant_blocked_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    offset_ptr,
    out_ptr,
    n_elements,
    absmax_blocksize,
    DOUBLE_QUANT: tl.constexpr,
    HALF: tl.constexpr,  # blocksize // 2 = packed bytes per quant block (a power of two)
    ROWS: tl.constexpr,  # quant blocks per program
    LOOKUP: tl.constexpr,  # 0: gather code[idx] from L1; 1: select tree; 2: tl.gather from a register table
):
    """A [ROWS, HALF] tile of whole quant blocks: the absmax chain is decoded once per block, not once per byte."""
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] quant-block indices
    blk_mask = blk * (2 * HALF) < n_elements
    absmax = _absmax(blk, blk_mask, absmax_ptr, absmax_q_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
                     absmax_blocksize, DOUBLE_QUANT)
    byte_offs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + byte_offs, mask=byte_offs * 2 < n_elements, other=0).to(tl.int32)
    if LOOKUP == 0:
        v_hi = tl.load(code_ptr + ((byte >> 4) & 15))
        v_lo = tl.load(code_ptr + (byte & 15))
    elif LOOKUP == 1:
        v_hi = _code_select((byte >> 4) & 15, code_ptr)
        v_lo = _code_select(byte & 15, code_ptr)
    else:
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (ROWS, 16))
        v_hi = tl.gather(table, (byte >> 4) & 15, 1)
        v_lo = tl.gather(table, byte & 15, 1)
    a = absmax[:, None]
    # (hi, lo) interleaved -> each row is one whole quant block of 2*HALF consecutive outputs.
    vals = tl.join(v_hi * a, v_lo * a).reshape([ROWS, 2 * HALF])
    out_offs = blk[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_elements)


@dataclasses.dataclass
class NF4Tensor:
    """An NF4-quantised weight (see the module docstring for the layout). Not an autograd leaf: it is frozen."""

    packed: torch.Tensor  # uint8 [ceil(n/2), 1]
    absmax_q: torch.Tensor | None  # uint8 [n_blocks] (double quant) ...
    absmax: torch.Tensor | None  # ... or fp32 [n_blocks] (no double quant)
    absmax_code: torch.Tensor | None  # fp32 [256] dynamic code
    absmax_scale: torch.Tensor | None  # fp32 [ceil(n_blocks / absmax_blocksize)]
    offset: torch.Tensor | None  # fp32 [1]
    code: torch.Tensor  # fp32 [16]
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original weight, the default dequantisation dtype
    blocksize: int = 64
    absmax_blocksize: int = 256

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device: torch.device | str) -> NF4Tensor:
        """Copy to ``device`` (all tensor fields)."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Tensor:  # noqa: ANN001 - bnb QuantState
        """Wrap a bitsandbytes ``Params4bit`` payload and its ``QuantState`` (NF4 only) without copying.

        The field mapping is in the module docstring; tests/kernels/test_ops_nf4.py checks it against
        bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (its CPU build): same bytes, same decoded values.
        """
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only nf4 is supported, got {quant_state.quant_type}")
        nested = getattr(quant_state, "nested", False)
        state2 = quant_state.state2 if nested else None
        return cls(
            packed=packed,
            absmax_q=quant_state.absmax if nested else None,
            absmax=None if nested else quant_state.absmax.float(),
            absmax_code=state2.code.float() if nested else None,
            absmax_scale=state2.absmax.float() if nested else None,
            offset=quant_state.offset.float().reshape(1) if nested else None,
            code=quant_state.code.float(),
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            absmax_blocksize=state2.blocksize if nested else 256,
        )

    BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")

    @classmethod
    def from_bnb_serialized(cls, packed: torch.Tensor, parts: dict[str, torch.Tensor],
                            dtype: torch.dtype | None = None) -> NF4Tensor:
        """Wrap a weight as transformers saves a bitsandbytes 4-bit model (no bitsandbytes import needed).

        A saved ``Linear4bit`` weight ``X.weight`` (uint8 ``[n / 2, 1]``) comes with ``X.weight.<suffix>`` tensors
        for the suffixes in :attr:`BNB_SUFFIXES`; the last one is the quant state's JSON as uint8 bytes
        (``quant_type``, ``blocksize``, ``dtype``, ``shape``, and with double quantisation ``nested_blocksize``,
        ``nested_offset``). ``parts`` maps suffix -> tensor. ``dtype`` overrides the stored original dtype
        (the dequantisation dtype).
        """
        meta = json.loads(bytes(parts["quant_state.bitsandbytes__nf4"].tolist()).decode())
        nested = "nested_absmax" in parts
        # the QuantState fields from_bnb reads, rebuilt from the saved tensors and the JSON (one mapping only)
        state = NS(quant_type=meta.get("quant_type"), nested=nested, absmax=parts["absmax"],
                   code=parts["quant_map"], shape=meta["shape"], blocksize=int(meta["blocksize"]),
                   dtype=dtype or getattr(torch, str(meta.get("dtype", "bfloat16")).removeprefix("torch.")),
                   offset=torch.tensor(float(meta["nested_offset"]), device=packed.device) if nested else None,
                   state2=NS(code=parts["nested_quant_map"], absmax=parts["nested_absmax"],
                             blocksize=int(meta.get("nested_blocksize", 256))) if nested else None)
        return cls.from_bnb(packed.reshape(-1, 1), state)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic-exponent 8-bit code (``functional.create_dynamic_map``), same float ops."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` for each value of ``x`` (ties -> lower index)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, right=False)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, absmax_blocksize: int = 256
) -> NF4Tensor:
    """Quantise a weight to NF4 (pure PyTorch: runs once at load time, on ``w``'s device).

    Args:
        w: Weight of any shape (typically ``[out, in]``), any float dtype.
        blocksize: Values per absmax block (even; 64 as in QLoRA).
        double_quant: Quantise the absmax vector to 8 bits (QLoRA's double quantisation).
        absmax_blocksize: Absmax values per second-level block (256 as in QLoRA).

    Returns:
        The :class:`NF4Tensor`.
    """
    if blocksize % 2:
        raise ValueError("blocksize must be even (two values per byte share a block)")
    n = w.numel()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    blocks = _blocks(w.detach().reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: divide by 1 instead so it encodes as code 7 (exactly 0).
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    idx = _nearest_code(normed, code).to(torch.uint8).reshape(-1)[:n]
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).reshape(-1, 1)
    if not double_quant:
        return NF4Tensor(packed, None, absmax, None, None, None, code, w.shape, w.dtype, blocksize, absmax_blocksize)
    offset = absmax.mean()
    centred = _blocks(absmax - offset, absmax_blocksize)
    scale = centred.abs().amax(dim=1)
    absmax_code = create_dynamic_map(signed=True).to(w.device)
    normed2 = centred / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    absmax_q = _nearest_code(normed2, absmax_code).to(torch.uint8).reshape(-1)[: absmax.numel()]
    return NF4Tensor(
        packed, absmax_q, None, absmax_code, scale, offset.reshape(1), code, w.shape, w.dtype, blocksize,
        absmax_blocksize,
    )  # fmt: skip


def decode_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 per-block absmax as the dequantiser sees it (after double-quant decoding)."""
    if not q.double_quant:
        return q.absmax
    scale = q.absmax_scale.repeat_interleave(q.absmax_blocksize)[: q.absmax_q.numel()]
    return q.absmax_code[q.absmax_q.long()] * scale + q.offset


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch NF4 dequantisation (fp32 math, one rounding to ``dtype``).

    Memory traffic (eager): reads n/2 bytes packed, but materialises int64 indices (8n bytes), fp32 values
    and the repeated absmax (4n each) before the output (2n for bf16): ~20 bytes/weight versus the kernel's
    0.5 + 2 = 2.5 bytes/weight.
    """
    n = q.numel()
    p = q.packed.reshape(-1)
    idx = torch.stack([(p >> 4) & 15, p & 15], dim=-1).reshape(-1)[:n].long()
    absmax = decode_absmax(q).repeat_interleave(q.blocksize)[:n]
    out = q.code[idx] * absmax
    return out.to(dtype or q.dtype).reshape(q.shape)


def dequantize_nf4_forward(
    q: NF4Tensor,
    dtype: torch.dtype,
    *,
    rows: int | None = None,
    num_warps: int | None = None,
    lookup: int | None = None,
    flat: bool | None = None,
) -> torch.Tensor:
    """Launch the dequantisation kernel; returns a contiguous tensor of ``q.shape`` in ``dtype``.

    The blocked kernel needs a power-of-two blocksize (bnb's are 32..4096); other even blocksizes, or
    ``flat`` (None: :data:`DEQUANT_DEFAULTS`), use the flat kernel (one program per 1024 packed bytes, absmax
    decoded per byte). Both give bit-identical outputs. ``rows``, ``num_warps``, ``lookup``: see
    :data:`DEQUANT_DEFAULTS` (None = default).
    """
    n = q.numel()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    dummy = q.code  # never read: stands in for the pointers of the disabled branch
    absmax_args = (
        q.absmax if q.absmax is not None else dummy,
        q.absmax_q if q.double_quant else dummy,
        q.absmax_code if q.double_quant else dummy,
        q.absmax_scale if q.double_quant else dummy,
        q.offset if q.double_quant else dummy,
    )
    given = {"flat": flat, "rows": rows, "num_warps": num_warps, "lookup": lookup}
    cfg = DEQUANT_DEFAULTS | {k: v for k, v in given.items() if v is not None}
    bs = q.blocksize
    if cfg["flat"] or bs & (bs - 1):
        grid = (triton.cdiv(triton.cdiv(n, 2), _BLOCK_BYTES),)
        runnable(_nf4_dequant_kernel)[grid](
            q.packed, q.code, *absmax_args, out, n, bs, q.absmax_blocksize,
            DOUBLE_QUANT=q.double_quant, BLOCK=_BLOCK_BYTES, num_warps=4,
        )  # fmt: skip
        return out
    rows = triton.next_power_of_2(max(1, cfg["rows"] * 64 // bs))  # the same bytes per program for any blocksize
    grid = (triton.cdiv(triton.cdiv(n, bs), rows),)
    runnable(_nf4_dequant_blocked_kernel)[grid](
        q.packed, q.code, *absmax_args, out, n, q.absmax_blocksize,
        DOUBLE_QUANT=q.double_quant, HALF=bs // 2, ROWS=rows,
        LOOKUP=cfg["lookup"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantise an :class:`NF4Tensor` (Triton kernel; reference on CPU without ``TRITON_INTERPRET=1``).

    Not differentiable (the base weight is frozen); callers recompute it in backward instead of saving it.

    Args:
        q: The quantised weight.
        dtype: Output dtype; defaults to the dtype of the weight that was quantised.

    Returns:
        A new contiguous tensor of shape ``q.shape``.
    """
    dtype = dtype or q.dtype
    if not use_triton(q.packed):
        return dequantize_nf4_reference(q, dtype)
    return dequantize_nf4_forward(q, dtype)
