"""Cheap activations remade in backward instead of kept: a decoder layer's norm outputs and its gated MLP activation.

A layer that keeps its activations for backward (one that does not recompute) keeps, per token, its input, both
norms' outputs, the residual after attention, q / k / v, the attention output, gate, up and the SwiGLU output: ~17
hidden-widths at the Llama-3.1-8B shapes, 0.57 GB per layer at 4,096 tokens. Three of those are outputs of cheap
row-wise ops whose inputs are kept anyway: each norm's output (its input, the residual stream, is what the norm's
own backward keeps) and the SwiGLU output (gate and up are what SwiGLU's backward keeps). They are kept only
because the next projection's backward needs its input (LoRA's ``dA = (dy B)^T x``, a full fine-tune's ``dW``).

:class:`RemadeSaves` is a pair of saved-tensor hooks around the layer's forward: when autograd saves a tensor that
the layer registered as remakeable (the same storage: the 2-D view a projection saves counts), it stores the recipe
instead, and backward runs the recipe (the same op on the kept inputs, no autograd) when it unpacks it. The op is the
one that made the tensor, on the same inputs, so the remade tensor is bitwise the forward's (the fused residual norm
rounds the sum before normalising, and the norm of that stored sum is what is remade). At the 8B shapes that is 5.5 of
the 17 widths per token (0.57 -> 0.39 GB per kept layer) for ~3 cheap row-wise passes per layer in backward.

Nothing changes for a layer that recomputes (its forward saves nothing until backward replays it, and the replay's
saves are unpacked at once), except that its backward's transient peak drops by the same tensors.

A kept layer may also remake its MLP's gate and up projections (``remake_mlp_layers``, :class:`Shared`): their
outputs, 2 x 14,336 of the 11.5 widths it still keeps at the 8B shapes (0.39 -> 0.15 GB per layer), are made again
in backward by the same projection from the remade norm output, once for the activation down_proj's backward needs
and for the gate and up SwiGLU's backward needs. One gate/up GEMM per layer (about half of the layer's forward)
instead of the whole layer's forward a recomputing layer runs again: the cheaper way to free a layer's memory while
there are kept layers left to free it from (kernels/trainer/plan.py weighs both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.trainer.config import MethodOptions


def _key(t: torch.Tensor) -> tuple[int, int, int, torch.dtype, torch.device]:
    """Identity of a tensor's data, the same for the tensor and a reshaped view of all of it."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype, t.device


class _Recipe:
    __slots__ = ("make", "shape")

    def __init__(self, make: Callable[[], torch.Tensor], shape: torch.Size) -> None:
        self.make, self.shape = make, shape

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.make().reshape(self.shape)


class RemadeSaves:
    """Saved-tensor hooks for one layer's forward: tensors registered with :meth:`remake` are saved as their recipe.

    Use as a context manager around the forward (``enabled`` False: a no-op, every tensor kept as autograd keeps it).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # key -> (recipe, the registered tensor): held until the forward ends, so that its memory cannot be handed to
        # another tensor of the same size meanwhile, which the key would then mistake for it
        self._recipes: dict[tuple, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {}
        self._hooks = None

    def __enter__(self) -> RemadeSaves:
        if self.enabled and torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self._recipes.clear()

    def remake(self, out: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Register ``out`` as remade by ``make()`` (same op, same kept inputs) when backward needs it; returns it."""
        if self._hooks is not None:
            self._recipes[_key(out)] = (make, out)
        return out

    def recipe(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """How ``t`` is remade: its registered recipe, or ``t`` itself where it has none (it is then kept)."""
        hit = self._recipes.get(_key(t)) if self._hooks is not None else None
        return (lambda: t) if hit is None else hit[0]

    def _pack(self, t: torch.Tensor):  # noqa: ANN202 - a tensor or a recipe
        hit = self._recipes.get(_key(t))
        return t if hit is None else _Recipe(hit[0], t.shape)

    @staticmethod
    def _unpack(p):  # noqa: ANN001, ANN205
        return p() if isinstance(p, _Recipe) else p


class Shared:
    """Tensors that several recipes remake from one computation: made by the first recipe that needs them, held for
    the others, dropped once ``takers`` recipes have taken them (:meth:`take`); :meth:`peek` uses them without taking.

    A kept layer's remade MLP projections: down_proj's backward peeks (the activation is made from gate and up), then
    SwiGLU's backward takes gate and takes up, and the pair is dropped. Made under the recipe's ``no_grad``.
    """

    __slots__ = ("_make", "_value", "_left")

    def __init__(self, make: Callable[[], tuple[torch.Tensor, ...]], takers: int) -> None:
        self._make, self._value, self._left = make, None, takers

    def peek(self) -> tuple[torch.Tensor, ...]:
        if self._value is None:
            self._value = self._make()
        return self._value

    def take(self) -> tuple[torch.Tensor, ...]:
        value = self.peek()
        self._left -= 1
        if self._left <= 0:
            self._value = None
        return value


def remade_mlp_layer_ids(n_layers: int, recomputed: frozenset[int] | None, checkpointing: bool,
                         count: int) -> frozenset[int]:
    """The layers whose MLP remakes gate and up in backward: the first ``count`` (-1: all) of those that keep their
    activations (``recomputed``: the recomputing layers, None meaning all of them when ``checkpointing``)."""
    if count == 0 or (checkpointing and recomputed is None):
        return frozenset()
    kept = [i for i in range(n_layers) if not (checkpointing and i in recomputed)]
    return frozenset(kept if count < 0 else kept[:count])


def mlp_remake_needs(o: MethodOptions, moe: bool, mlp_chunk_tokens: int | None) -> list[str]:
    """What a layer's MLP lacks to remake its gate and up in backward (empty: it can), for the trainer that refuses
    the knob and the planner that offers it."""
    return [w for w, bad in (("remake_activations", not o.remake_activations),
                             ("lora_dropout 0 (a projection made again would draw new dropout masks)",
                              o.lora_dropout > 0),
                             ("a dense MLP (not a mixture of experts)", moe),
                             ("the MLP over all tokens at once (not mlp_chunk_tokens)", mlp_chunk_tokens)) if bad]


def mark_remade_mlp(model: torch.nn.Module, o: MethodOptions) -> frozenset[int]:
    """On a :class:`~kernels.trainer.model.DecoderModel`, set which kept layers remake their MLP's gate and up in
    backward (``remake_mlp_layers``), after ``model.checkpointed_layers`` is set; returns their ids.

    Raises:
        ValueError: where the projections cannot be made again bitwise or at all (LoRA dropout draws new masks;
            without ``remake_activations`` nothing is remade; Mixtral's experts and a tiled MLP keep their own).
    """
    if o.remake_mlp_layers < -1:
        raise ValueError(f"remake_mlp_layers must be -1 (all kept layers) or >= 0, got {o.remake_mlp_layers}")
    if o.remake_mlp_layers and (why := mlp_remake_needs(o, model.cfg.moe, o.mlp_chunk_tokens)):
        raise ValueError(f"remake_mlp_layers needs {' and '.join(why)}")
    ids = remade_mlp_layer_ids(model.cfg.num_layers, model.checkpointed_layers, o.gradient_checkpointing,
                               o.remake_mlp_layers)
    for i, layer in enumerate(model.model.layers):
        layer.remake_mlp = i in ids
    return ids


class TiledMLP(torch.autograd.Function):
    """A dense MLP over chunks of ``chunk`` tokens that keeps only its input for backward (``mlp_chunk_tokens``).

    Forward runs the MLP chunk by chunk without a graph; backward runs each chunk again with one and backpropagates
    through it at once, so gate, up and the activation exist for one chunk at a time instead of for every token: at
    long context they are most of a layer's backward peak (7 of the 11.5 hidden-widths per token a Llama layer keeps
    with :class:`RemadeSaves`). The cost is one more MLP forward per layer and step. The MLP's parameters get their
    gradients from those inner backwards (as :class:`kernels.trainer.offload.LayerCheckpoint`'s do), once per chunk,
    which is why a run over several processes (whose gradient hooks fire once per parameter) cannot use it. The
    parameters are inputs only so that the output requires grad where the input does not (the first layers of a
    frozen base).
    """

    @staticmethod
    def forward(ctx, x, mlp, chunk, *params):  # noqa: ANN001, ANN205
        ctx.mlp, ctx.chunk, ctx.n_params = mlp, chunk, len(params)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return chunked_mlp(mlp, x, chunk)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        rows, drows = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty_like(rows) if need_dx else None
        for i in range(0, rows.shape[0], ctx.chunk):
            xc = rows[i:i + ctx.chunk].detach().requires_grad_(need_dx)
            with torch.enable_grad():
                y = ctx.mlp(xc)
            if y.requires_grad:
                torch.autograd.backward(y, drows[i:i + ctx.chunk])
            if need_dx:
                dx[i:i + ctx.chunk] = xc.grad
        return (dx.view_as(x) if need_dx else None, None, None) + (None,) * ctx.n_params


def chunked_mlp(mlp: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``mlp(x)`` over chunks of ``chunk`` tokens, each chunk's output written into one output tensor: gate, up and
    the activation exist for one chunk at a time (no graph is recorded here: callers run it without one)."""
    rows = x.reshape(-1, x.shape[-1])
    first = mlp(rows[:chunk])
    out = first.new_empty((rows.shape[0], first.shape[-1]))
    out[:chunk] = first
    del first
    for i in range(chunk, rows.shape[0], chunk):
        out[i:i + chunk] = mlp(rows[i:i + chunk])
    return out.view(*x.shape[:-1], out.shape[-1])


def tiled_mlp(mlp: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``mlp(x)`` through :class:`TiledMLP` when autograd records; without a graph (the forward of a layer that
    recomputes in backward, evaluation) over chunks all the same: untiled, that forward alone would hold gate, up and
    the activation for every token (at 61,440 tokens of the 8B shapes 5.3 GB), more than a tiled layer's backward."""
    if not torch.is_grad_enabled():
        return chunked_mlp(mlp, x, chunk)
    return TiledMLP.apply(x, mlp, chunk, *(p for p in mlp.parameters() if p.requires_grad))
