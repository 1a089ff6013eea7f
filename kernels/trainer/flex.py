"""FlexAttention for the attention no flash kernel here takes: soft-capped scores (Gemma-2) and sliding windows
shorter than the rows (Gemma-2's and Gemma-3's local layers, Phi-3-mini at 2048 rows, Mistral-style windows).

``torch.nn.attention.flex_attention`` with a ``score_mod`` for the cap (``cap * tanh(score / cap)`` on the fp32
scores, after ``scale``), a block mask for causal + window + packed samples, and ``enable_gqa`` (KV heads not
repeated), compiled once per process on first use (``torch.compile``): Triton kernels that keep no
``[B, H, S, S]`` tensor; what a layer keeps for backward is the output and the fp32 logsumexp ``[B, H, S]``, as
flash attention.

Where it runs (:func:`flex_layer`, the one place that decides): on CUDA, bf16/fp16 activations, a torch that has
it, ``MethodOptions.flex_attention`` on, and a layer with a soft cap or a window shorter than the rows. Everywhere
else the layers take :func:`~kernels.trainer.torch_ops.softcap_attention` or SDPA with a window mask, as without
this module: on the CPU FlexAttention has no backward (its forward runs uncompiled there, which the tests use).

Block masks (128 x 128 tiles), made once per forward by the model and passed to the layers as their ``mask``
argument, so a checkpointed layer's recompute (:class:`~kernels.trainer.offload.LayerCheckpoint`) gets the very
mask its forward had:

- unpacked rows: causal (+ window), built once per ``(length, window, device)`` and kept (:func:`block_mask`):
  ``create_block_mask`` is not free, and a CUDA-graphed step (:class:`~kernels.trainer.train.StepGraph`) must
  not build one; its eager warm-up steps build it before the capture;
- packed rows (``position_ids`` restarting at 0 per sample; never graphed): per forward. A token's sample is the
  count of position-0 tokens up to it; the window is a position difference inside the sample, as
  :func:`~kernels.trainer.torch_ops.window_mask` measures it;
- preference pairs sharing their prompt (:class:`~kernels.trainer.attention.SharedPrompts`): same pair, key in
  the prompt or in the query's own branch, key position <= query position (and within the window).

Compilation: one compiled function, specialised per dtype, grad mode (a checkpointed layer's forward runs without
grad, its recompute with), cap value and mask kind. Shapes start static (fixed-length rows, the benchmarks'
case, keep the static kernel); a second row length recompiles it with dynamic lengths (dynamo's default), so rows
of varying length cost a few compiles, not one per length. Its own recompile limit is :data:`RECOMPILE_LIMIT`
(dynamo's default of 8 is near what two mask kinds in both grad modes take); beyond it dynamo runs the function
uncompiled: correct, but materialising the scores as the eager path does.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # a torch without FlexAttention: the layers keep their eager / SDPA paths
    _flex = None

class SharedPairs(Protocol):
    """What a shared-prompt mask needs of :class:`~kernels.trainer.attention.SharedPrompts` (named by shape, so
    this module does not import the attention module that calls it)."""

    doc: torch.Tensor  # [T] the pair of each token
    branch: torch.Tensor  # [T] 0 prompt, 1 chosen, 2 rejected


FLEX_AVAILABLE = _flex is not None and hasattr(_flex, "create_block_mask")
RECOMPILE_LIMIT = 64
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def flex_runs(device: torch.device | str, dtype: torch.dtype, enabled: bool, available: bool = FLEX_AVAILABLE
              ) -> bool:
    """Whether FlexAttention may run for activations of ``dtype`` on ``device``: CUDA, bf16/fp16, ``enabled``
    (``MethodOptions.flex_attention``) and ``available`` (this torch has it)."""
    return bool(available and enabled and torch.device(device).type == "cuda" and dtype in _LOW_PRECISION)


def flex_layer(device: torch.device | str, dtype: torch.dtype, enabled: bool, softcap: float | None,
               window: int | None, seq: int, available: bool = FLEX_AVAILABLE) -> bool:
    """Whether a layer's attention takes FlexAttention: where :func:`flex_runs` and the layer has a soft cap, or a
    ``window`` shorter than its ``seq``-token rows (the layers that otherwise take eager soft-capped attention or
    SDPA with a bool mask).

    Args:
        device / dtype: where the activations are and their dtype.
        enabled: ``MethodOptions.flex_attention``.
        softcap: the layer's score cap, or None.
        window: the layer's sliding window, or None for a full-attention layer.
        seq: the rows' length.
        available: this torch has FlexAttention.
    """
    needed = softcap is not None or (window is not None and seq > window)
    return needed and flex_runs(device, dtype, enabled, available)


def is_block_mask(mask: object) -> bool:
    """``mask`` is a FlexAttention block mask (the layer's argument on the flex path)."""
    return FLEX_AVAILABLE and isinstance(mask, _flex.BlockMask)


@functools.cache
def _causal_mod(window: int | None):  # noqa: ANN202
    """The unpacked rows' mask_mod, one function per window (the compiled attention guards on its code)."""
    if window is None:
        def causal(b, h, q, k):  # noqa: ANN001, ANN202
            return q >= k
        return causal

    def sliding(b, h, q, k):  # noqa: ANN001, ANN202
        return (q >= k) & (q - k < window)
    return sliding


_UNPACKED: dict[tuple[int, int | None, torch.device], Any] = {}


def _packed_mod(position_ids: torch.Tensor, window: int | None):  # noqa: ANN202
    """Causal inside each packed sample (a sample starts at every position 0), within ``window`` positions."""
    pos = position_ids
    doc = (pos == 0).cumsum(-1)

    def packed(b, h, q, k):  # noqa: ANN001, ANN202
        dist = pos[b, q] - pos[b, k]
        ok = (doc[b, q] == doc[b, k]) & (q >= k) & (dist >= 0)
        return ok & (dist < window) if window is not None else ok
    return packed


def _shared_mod(shared: SharedPairs, position_ids: torch.Tensor, window: int | None):  # noqa: ANN202
    """:meth:`SharedPrompts.mask <kernels.trainer.attention.SharedPrompts.mask>` as a mask_mod, within ``window``."""
    pos, doc, branch = position_ids.reshape(-1), shared.doc, shared.branch

    def pairs(b, h, q, k):  # noqa: ANN001, ANN202
        dist = pos[q] - pos[k]
        ok = (doc[q] == doc[k]) & (dist >= 0) & ((branch[k] == 0) | (branch[k] == branch[q]))
        return ok & (dist < window) if window is not None else ok
    return pairs


def block_mask(seq: int, window: int | None, device: torch.device | str, position_ids: torch.Tensor | None = None,
               shared: SharedPairs | None = None) -> Any:
    """The block mask of one kind of layer (``window`` None: full causal attention) for ``seq``-token rows.

    Args:
        seq: the rows' length.
        window: keys each query sees at most (the query's own included), or None.
        device: where the attention runs.
        position_ids: ``[B, S]`` of packed rows, or None for one sample per row (then the mask is cached).
        shared: preference pairs sharing their prompt (with their ``[1, T]`` ``position_ids``).

    Returns:
        A ``BlockMask`` of ``[B or 1, 1, seq, seq]``.
    """
    device = torch.device(device)
    if position_ids is None:
        key = (seq, window, device)
        if key not in _UNPACKED:
            _UNPACKED[key] = _flex.create_block_mask(_causal_mod(window), None, None, seq, seq, device=device)
        return _UNPACKED[key]
    if shared is not None:
        mod, rows = _shared_mod(shared, position_ids, window), 1
    else:
        mod, rows = _packed_mod(position_ids, window), position_ids.shape[0]
    return _flex.create_block_mask(mod, rows, None, seq, seq, device=device)


# the training kernel, never the decoding one: Inductor picks its flex-decoding kernel for queries shorter than 128
# tokens (made for generation), and for some of those shapes (tiny Gemma-3: head_dim 16, 4 query heads per KV head)
# it has no config at all ("NoValidChoicesError"); BACKEND is the newer torch's switch, FORCE_USE_FLEX_ATTENTION
# the older one's (a torch refuses both together)
_OPTIONS = getattr(getattr(_flex, "FlexKernelOptions", None), "__annotations__", {})
TRAINING_KERNEL = {"BACKEND": "TRITON"} if "BACKEND" in _OPTIONS else {"FORCE_USE_FLEX_ATTENTION": True}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float | None,
            softcap: float | None) -> torch.Tensor:
    def capped(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return softcap * torch.tanh(score / softcap)

    return _flex.flex_attention(q, k, v, score_mod=capped if softcap is not None else None, block_mask=mask,
                                scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=TRAINING_KERNEL)


@functools.cache
def _compiled():  # noqa: ANN202
    """:func:`_attend` compiled, made on first use (once per process), with its own recompile limit."""
    compiled = torch.compile(_attend)  # static first, dynamic lengths from the first recompile on
    # the scale and the cap stay constants of each compiled graph: a value that changes between calls (another
    # model in the process) would otherwise become a symbolic float, which flex's score_mod cannot take
    floats = {"specialize_float": True} if hasattr(torch._dynamo.config, "specialize_float") else {}
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, **floats)(compiled)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float | None,
                softcap: float | None) -> torch.Tensor:
    """Attention through FlexAttention: ``[B, H, S, D]`` q and ``[B, Hkv, S, D]`` k/v in, ``[B, H, S, D]`` out.

    Args:
        q, k, v: projections after RoPE (grouped KV heads are not repeated).
        mask: a :func:`block_mask`.
        scale: the score scale (None: ``head_dim ** -0.5``).
        softcap: ``cap`` of ``cap * tanh(scores / cap)``, or None.

    Compiled on CUDA; elsewhere FlexAttention's uncompiled forward (it materialises the scores, and on the CPU has
    no backward): what the CPU tests compare with the eager paths.
    """
    return (_compiled() if q.is_cuda else _attend)(q, k, v, mask, scale, softcap)
