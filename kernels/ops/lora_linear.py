"""LoRA / QLoRA linear layer with a hand-written backward that never computes the frozen weight's gradient.

``y = x W^T (+ bias) + scale * (dropout(x) A^T) B^T`` with ``W [out, in]`` frozen (dense, or an
:class:`~kernels.ops.nf4.NF4Tensor` for QLoRA), ``A [r, in]``, ``B [out, r]``.

Backward computes only ``dx = dy W + scale * mask/(1-p) * ((dy B) A)``, ``dA = scale * (dy B)^T x_drop``,
``dB = scale * dy^T (x_drop A^T)`` and ``dbias`` -- never ``dW``.

Everything here is cuBLAS GEMMs on purpose: at Llama-8B shapes every product is either large (x W^T:
2 x 4096 x 4096 x 14336 = 481 GFLOP) or has K or N = r = 16, where a hand-written Triton GEMM would not beat
cuBLAS. What the structure saves:

* ``scale * xa @ B^T`` is accumulated into the base output by ``addmm_`` (beta = 1): the LoRA branch costs
  no extra pass over ``y``; likewise ``(dy B) A`` into ``dx`` when there is no dropout.
* Saved for backward: ``x`` (usually already alive: shared with the other projections reading the same
  normed activations), a bool dropout mask (1 byte/elt instead of the 2-byte dropped copy autograd would keep),
  and ``s * x_drop A^T`` as a bf16 (hi, lo) pair (``[T, 2r]``, tiny). PEFT additionally saves the dropped ``x``.
* Precision: the ``[T, r]`` intermediates ``s * x_drop A^T`` and ``s * dy B`` are GEMM outputs in fp32
  (``out_dtype=float32``) and enter the token-reduction GEMMs of dB / dA as hi + lo bf16 pairs (2r columns,
  same bytes read), so dA/dB are rounded once. Rounding them to bf16 first (what PEFT/eager does) gives an
  absolute dA error ~ s sqrt(T) 2^-9 |dy B| |x| that does not shrink with |dA| (kernels/NOTES.md).
  ``1/(1-p)`` is folded into ``s`` so the dropped ``x`` is ``x * mask``, exact.
* QLoRA: the NF4 weight is dequantised into a temporary, used by one GEMM and freed at once; backward
  dequantises again (29 MB read + 117 MB written per 4096 x 14336 projection: 0.058 ms measured on an H100
  against a ~0.66 ms GEMM) instead of keeping a bf16 copy alive across the whole forward. Inside
  :func:`reuse_dequantised` (a checkpointed layer's recompute, whose backward follows at once) the forward's
  dequantised weight stays on the autograd ctx instead, and backward uses it for ``dy W`` and drops it.

Further fusion, not done: dropout applied in the prologue of the ``x A^T`` GEMM (no ``x_drop`` temporary) would
pay; NF4 dequantisation inside the GEMM's weight-tile load would remove the temporary but decode every weight
tile once per M-tile (32 times at 4096 tokens), which kernels/NOTES.md estimates slower than the separate kernel
(~6 % of a fast QLoRA step with the blocked NF4 kernel) at training shapes. DoRA is not in this op: the trainer
runs it in plain torch (kernels/trainer/linear.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from kernels.ops._utils import use_triton
from kernels.ops.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool keep-mask with keep probability ``1 - p``; draws fp32 uniforms so RNG use is dtype-independent."""
    return torch.rand(shape, dtype=torch.float32, device=device) >= p


def _check_frozen(weight: torch.Tensor | NF4Tensor) -> None:
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear never computes dW: freeze the base weight (requires_grad_(False))")


def _base_weight(weight: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(weight, dtype) if isinstance(weight, NF4Tensor) else weight


_REUSE = threading.local()


@contextlib.contextmanager
def reuse_dequantised(enabled: bool = True) -> Iterator[None]:
    """While inside (with ``enabled``), a forward of the NF4 ops keeps the dequantised weight it made for backward.

    Read at forward time by :class:`LoRALinearFunction`, :class:`LoRAGroupFunction` and the trainer's adapter-less
    NF4 linear (``kernels.trainer.linear._NF4Linear``): each keeps its NF4 weights' dequantised copies on its ctx
    (not in ``save_for_backward``: no version counter, no saved-tensor hooks) and its backward computes ``dy W``
    with them instead of dequantising again, dropping each right after its GEMM. Dense weights (LoRA, or weights
    streamed from the host) are never kept: they are alive anyway. Only for a forward whose backward follows at
    once: :class:`kernels.trainer.offload.LayerCheckpoint` enters it around a layer's recompute, where it saves one
    dequantisation per NF4 weight for the layer's bf16 weights held from the end of the recompute until their
    backward GEMMs. A forward run under ``no_grad`` inside it keeps nothing past the op (its ctx dies with it).

    Thread-local (the recompute runs on the autograd engine's thread, which reads it in the same thread) and
    restored on exit, exceptions included. Host-side only: under CUDA-graph capture it decides which tensors the
    captured kernels read, and the replay reads the same ones.
    """
    before = reusing_dequantised()
    _REUSE.on = enabled
    try:
        yield
    finally:
        _REUSE.on = before


def reusing_dequantised() -> bool:
    """Whether an NF4 op's forward keeps its dequantised weight for its backward now (:func:`reuse_dequantised`)."""
    return getattr(_REUSE, "on", False)


def _kept(weight: torch.Tensor | NF4Tensor, dense: torch.Tensor) -> torch.Tensor | None:
    """What a forward keeps of ``dense`` (the base weight it used) for its backward: the dequantised copy of an
    NF4 weight inside :func:`reuse_dequantised`, else nothing."""
    return dense if isinstance(weight, NF4Tensor) and reusing_dequantised() else None


def _dx_weight(weight: torch.Tensor | NF4Tensor, kept: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight for backward's ``dy W``: the forward's kept copy where it has ``dtype``, else made again."""
    return kept if kept is not None and kept.dtype == dtype else _base_weight(weight, dtype)


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result for bf16/fp16 inputs (cuBLAS accumulates in fp32 anyway: only the output
    rounding is avoided). CUDA: ``torch.mm(out_dtype=float32)`` (torch >= 2.8), no fp32 copy of the inputs.
    CPU (tests): upcast, same values. fp32/fp64 inputs: plain ``a @ b``."""
    if not _low_precision(a.dtype):
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm.dtype on CUDA
            _MM_OUT_DTYPE[0] = False
    return a.float() @ b.float()


_MM_OUT_DTYPE = [True]  # flips to False once if this torch lacks the fp32-output matmul (never seen on 2.11)


def _hi_lo(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``[n, r]`` -> ``[n, 2r]`` in ``dtype`` holding ``hi = rn(t)`` and ``lo = rn(t - hi)``.

    ``hi + lo`` equals ``t`` to ~2^-17 (bf16) relative, so a GEMM with this as one operand and an fp32 output is
    as accurate as an fp32 operand would be, at bf16 GEMM speed (one GEMM with 2r instead of r columns: at
    r = 16 these GEMMs are bandwidth-bound on the other, [T, in] or [T, out], operand). fp32/fp64: ``t``.
    One block of :func:`_hi_lo_blocks`."""
    return _hi_lo_blocks(t, dtype, 1)


def _sum_halves(p: torch.Tensor, dim: int, compute: torch.dtype, out: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_hi_lo` on a GEMM result computed in ``compute`` precision: add the hi and lo halves
    along ``dim`` (fp32) and round once to ``out`` (the parameter's storage dtype: no rounding for fp32)."""
    if not _low_precision(compute):
        return p.to(out)
    hi, lo = p.chunk(2, dim)
    return torch.add(hi, lo, out=torch.empty(hi.shape, dtype=out, device=p.device))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd wrapper; ``weight`` is passed as a plain object so autograd never tracks it."""

    @staticmethod
    def forward(ctx, x2, lora_a, lora_b, bias, weight, scale, dropout_p, mask):  # noqa: ANN001, ANN205
        # 2-D in, 2-D out: the public wrapper reshapes outside the Function so that views of the output can be
        # modified in place later (e.g. RoPE on q_proj(x).view(B, S, H, D)); autograd forbids that otherwise.
        # A/B may be stored in another dtype (fp32, PEFT's default): cast here for the GEMMs (no autograd node
        # per cast), and dA/dB go back in the storage dtype, rounded once (backward)
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        lora_a, lora_b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        w = _base_weight(weight, x2.dtype)
        y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
        ctx.kept = _kept(weight, w)  # NF4: None (the copy dies here, backward makes it again) but in a recompute
        del w
        # 1/(1-p) is folded into the scale: x * mask is exact in any dtype, x * mask / (1-p) would round.
        s = scale / (1.0 - dropout_p) if mask is not None else scale
        x_m = x2 * mask if mask is not None else x2
        xa = _mm_f32(x_m, lora_a.t()).mul_(s)  # [T, r] fp32: s * x_drop A^T
        del x_m
        xa_hl = _hi_lo(xa, x2.dtype)  # [T, 2r] (hi, lo); saved for dB instead of a rounded xa
        y.addmm_(xa_hl[:, : lora_a.shape[0]], lora_b.t())
        ctx.save_for_backward(x2, mask, xa_hl, lora_a, lora_b)
        ctx.weight, ctx.scale = weight, s
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x2, mask, xa_hl, lora_a, lora_b = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # freed after dx's GEMM below (or at return, without dx)
        s, r, dtype = ctx.scale, lora_a.shape[0], dy.dtype
        need_dx, need_da, need_db, need_dbias = ctx.needs_input_grad[:4]
        dx = da = db = dbias = None
        a_dtype, b_dtype = ctx.ab_dtypes
        if need_db:  # dB = dy^T (s xa): reduction over tokens with fp32 output, (s xa) as hi + lo
            db = _sum_halves(_mm_f32(dy.t(), xa_hl), 1, dtype, b_dtype)
        if need_dx or need_da:
            # s * dy B in fp32, as hi + lo: rounded to bf16 (rel. 2^-9) before the token reduction, dA misses
            # the bf16 tolerance near zero (kernels/NOTES.md, "lora_linear precision")
            sdyb_hl = _hi_lo(_mm_f32(dy, lora_b).mul_(s), dtype)  # [T, 2r]
            if need_da:
                x_m = x2 * mask if mask is not None else x2
                da = _sum_halves(_mm_f32(sdyb_hl.t(), x_m), 0, dtype, a_dtype)
                del x_m
            if need_dx:
                w = _dx_weight(ctx.weight, kept, dtype)
                kept = None
                dx = dy @ w
                del w
                # r-term reduction with O(1/sqrt(in)) weights: the hi part alone is accurate enough here
                if mask is None:
                    dx.addmm_(sdyb_hl[:, :r], lora_a)
                else:
                    dx.add_((sdyb_hl[:, :r] @ lora_a).mul_(mask))
        if need_dbias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, da, db, dbias, None, None, None, None


def _hi_lo_blocks(t: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """:func:`_hi_lo` of ``n`` equal column blocks of fp32 ``t [T, n r]``, laid out block by block:
    ``[hi_0, lo_0, hi_1, lo_1, ...]`` (``[T, 2 n r]``), so block ``i``'s pair is one contiguous column range
    (one GEMM operand) and its hi part alone another. fp32/fp64: ``t`` itself, blocks of ``r``."""
    if not _low_precision(dtype):
        return t.to(dtype)
    rows, cols = t.shape
    r = cols // n
    out = torch.empty(rows, n, 2, r, dtype=dtype, device=t.device)
    t3 = t.view(rows, n, r)
    out[:, :, 0].copy_(t3)
    torch.sub(t3, out[:, :, 0], out=out[:, :, 1])
    return out.view(rows, 2 * cols)


class LoRAGroupFunction(torch.autograd.Function):
    """``n`` LoRA projections of one input (q/k/v, gate/up) as one autograd node.

    The same maths as ``n`` :class:`LoRALinearFunction` calls (no dropout: PEFT draws one mask per module, so
    dropped inputs differ per projection and cannot share a GEMM). What it saves per group:

    * one ``x [A_0; ...; A_n]^T`` GEMM instead of ``n`` (the A's concatenated: ``[T, n r]``), one hi/lo split;
    * in backward, ``dx = sum_i dy_i W_i + [s dy_0 B_0, ...] [A_0; ...]`` accumulated by ``addmm_`` (beta = 1)
      into one buffer: no ``n - 1`` separate ``[T, in]`` gradient tensors for autograd to add up; one dA GEMM
      for all A's; one autograd node instead of ``n`` (host time in a launch-bound step).

    The LoRA term of ``dx`` uses ``hi + lo`` of ``s dy B`` (K = 2 n r), i.e. is more accurate than the single
    op's hi-only term. Inputs after ``x2``: ``weights`` (tuple, untracked), ``scale``, then ``n`` A's, ``n`` B's
    and ``n`` biases (None where absent). Returns ``n`` separate 2-D outputs (not views of one buffer: each
    may be modified in place later, as RoPE does to q and k).
    """

    @staticmethod
    def forward(ctx, x2, weights, scale, *params):  # noqa: ANN001, ANN205
        n = len(weights)
        lora_as, lora_bs, biases = params[:n], params[n:2 * n], params[2 * n:]
        dtype = x2.dtype
        ctx.ab_dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_as, lora_bs, strict=True)]
        a_cat = torch.cat([a.to(dtype) for a in lora_as])  # [n r, in]
        bs = [b.to(dtype) for b in lora_bs]
        r = lora_as[0].shape[0]
        xa_hl = _hi_lo_blocks(_mm_f32(x2, a_cat.t()).mul_(scale), dtype, n)  # [T, 2 n r]: (hi_i, lo_i) per block
        outs, kept = [], []
        for i, (w, b, bias) in enumerate(zip(weights, bs, biases, strict=True)):
            wd = _base_weight(w, dtype)
            y = x2 @ wd.t() if bias is None else torch.addmm(bias, x2, wd.t())
            kept.append(_kept(w, wd))  # NF4: None (the copy dies here) but in a recompute
            del wd
            y.addmm_(_block(xa_hl, i, r, dtype)[:, :r], b.t())
            outs.append(y)
        ctx.save_for_backward(x2, xa_hl, a_cat, *bs)
        ctx.weights, ctx.kept, ctx.scale, ctx.n, ctx.r = weights, kept, scale, n, r
        ctx.has_bias = [bias is not None for bias in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):  # noqa: ANN001, ANN205
        x2, xa_hl, a_cat, *bs = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # each freed after its dx GEMM below
        n, r, s, dtype = ctx.n, ctx.r, ctx.scale, dys[0].dtype
        needs = ctx.needs_input_grad
        need_dx = needs[0]
        need_da = any(needs[3:3 + n])
        dbs, das, dbias = [None] * n, [None] * n, [None] * n
        for i, dy in enumerate(dys):
            if needs[3 + n + i]:  # dB_i = dy_i^T (s xa_i), (s xa_i) as hi + lo
                dbs[i] = _sum_halves(_mm_f32(dy.t(), _block(xa_hl, i, r, dtype)), 1, dtype, ctx.ab_dtypes[i][1])
            if needs[3 + 2 * n + i] and ctx.has_bias[i]:
                dbias[i] = dy.sum(0)
        dx = None
        if need_dx or need_da:
            sdyb = torch.cat([_mm_f32(dy, b) for dy, b in zip(dys, bs, strict=True)], 1).mul_(s)  # [T, n r] fp32
            sdyb_hl = _hi_lo_blocks(sdyb, dtype, n)
            del sdyb
            if need_da:  # all dA_i in one GEMM: rows (hi_0, lo_0, hi_1, ...) of [2 n r, in]
                da_hl = _mm_f32(sdyb_hl.t(), x2)
                for i in range(n):
                    if needs[3 + i]:
                        das[i] = _sum_halves(_block(da_hl, i, r, dtype, 0), 0, dtype, ctx.ab_dtypes[i][0])
            if need_dx:
                for i, dy in enumerate(dys):
                    w = _dx_weight(ctx.weights[i], kept[i], dtype)
                    kept[i] = None
                    if dx is None:
                        dx = dy @ w
                    else:
                        dx.addmm_(dy, w)
                    del w
                # hi and lo both meet A (K = 2 n r): [A_0; A_0; A_1; A_1; ...] for fp32 halves, A itself otherwise
                a_rep = (a_cat.view(n, 1, r, -1).expand(n, 2, r, a_cat.shape[1]).reshape(2 * n * r, -1)
                         if _low_precision(dtype) else a_cat)
                dx.addmm_(sdyb_hl, a_rep)
        return (dx, None, None, *das, *dbs, *dbias)


def _block(t: torch.Tensor, i: int, r: int, dtype: torch.dtype, dim: int = 1) -> torch.Tensor:
    """Block ``i`` along ``dim`` of a :func:`_hi_lo_blocks` layout: ``(hi_i, lo_i)`` (``2r``) for bf16/fp16,
    the ``r`` entries themselves for fp32/fp64."""
    w = 2 * r if _low_precision(dtype) else r
    return t.narrow(dim, i * w, w)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Pure-PyTorch LoRA linear in float32 (float64 for float64 ``x``), autograd-differentiable (W detached).

    Memory traffic beyond the GEMMs (eager PEFT-style): the dropout output (T x in, saved by autograd), the
    ``[T, out]`` LoRA output and the add into ``y`` (read 2, write 1 of T x out).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_nf4_reference(weight, compute) if isinstance(weight, NF4Tensor) else weight
    xc = x.to(compute)
    y = xc @ w.detach().to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    x_drop = xc * mask / (1.0 - dropout_p) if mask is not None else xc
    y = y + scale * ((x_drop @ lora_a.to(compute).t()) @ lora_b.to(compute).t())
    return y.to(x.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """LoRA (or QLoRA, with an NF4 base weight) linear layer.

    On CPU without ``TRITON_INTERPRET=1`` this runs :func:`lora_linear_reference` (NF4 weights dequantised by
    the PyTorch reference); same maths and the same dropout mask stream.

    Args:
        x: ``[..., in]`` activations (bf16/fp16/fp32).
        weight: Frozen base weight ``[out, in]`` in ``x``'s dtype, or an :class:`NF4Tensor` of that shape.
            A dense weight with ``requires_grad=True`` is rejected (its gradient would silently be missing).
        lora_a: ``[r, in]`` LoRA A, in ``x``'s dtype or a wider storage dtype (fp32, as PEFT keeps it): cast to
            ``x``'s dtype for the GEMMs inside the op; its gradient comes back in the storage dtype, computed
            in fp32 and rounded once (not rounded to ``x``'s dtype first, as a separate cast would).
        lora_b: ``[out, r]`` LoRA B, likewise.
        scale: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        bias: Optional ``[out]`` bias (trainable or frozen).
        dropout_p: LoRA dropout probability on the input of A.
        training: Dropout is applied only when True.

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    _check_frozen(weight)
    mask = dropout_mask(x.shape, dropout_p, x.device) if (training and dropout_p > 0) else None
    p = dropout_p if mask is not None else 0.0
    if not use_triton(x):
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias, mask, p)
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = mask.reshape(x2.shape) if mask is not None else None
    y = LoRALinearFunction.apply(x2, lora_a, lora_b, bias, weight, scale, p, mask2)
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_linear_group(
    x: torch.Tensor,
    weights: list[torch.Tensor | NF4Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scale: float,
    biases: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """``[lora_linear(x, weights[i], lora_as[i], lora_bs[i], scale, biases[i]) for i ...]`` in one autograd node
    (:class:`LoRAGroupFunction`): the projections of one input that share a rank and a scale, without dropout
    (q/k/v of attention, gate/up of the MLP). Same arguments as :func:`lora_linear`, one list entry per
    projection; returns one ``[..., out_i]`` tensor per projection. On CPU without ``TRITON_INTERPRET=1``
    each projection runs :func:`lora_linear_reference`.
    """
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    if not (len(lora_as) == len(lora_bs) == len(biases) == n) or n == 0:
        raise ValueError(f"lora_linear_group: {n} weights, {len(lora_as)} A's, {len(lora_bs)} B's, "
                         f"{len(biases)} biases")
    if len({a.shape[0] for a in lora_as}) != 1:
        raise ValueError(f"lora_linear_group: ranks differ {[a.shape[0] for a in lora_as]}; call lora_linear")
    for w in weights:
        _check_frozen(w)
    if not use_triton(x):
        return [lora_linear_reference(x, w, a, b, scale, bias)
                for w, a, b, bias in zip(weights, lora_as, lora_bs, biases, strict=True)]
    x2 = x.reshape(-1, x.shape[-1])
    ys = LoRAGroupFunction.apply(x2, tuple(weights), scale, *lora_as, *lora_bs, *biases)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]
