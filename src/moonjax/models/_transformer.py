"""Reversible transformer blocks (Reformer / Rev-ViT style)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn import MLP, ConfigError, Invertible, RevBlock, Stack


class SelfAttention(nnx.Module):
    """Multi-head scaled dot-product self-attention on ``(batch, seq, d_model)``.

    ``softmax(q kᵀ / √d_head) v`` per head, with ``q, k, v`` from one dense layer and an
    output projection. No dropout and no RNG state, so it can sit inside a
    ``Stack``.

    Args:
      d_model: model width (divisible by ``num_heads``).
      num_heads: number of heads.
      rngs: random streams.
      causal: mask attention to earlier positions.
      param_dtype: dtype of the parameters.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        causal: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads:
            raise ConfigError(
                f"SelfAttention needs d_model divisible by num_heads; got d_model={d_model}, "
                f"num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.causal = bool(causal)
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs, param_dtype=param_dtype)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, seq, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(x).reshape(*lead, seq, 3 * h, d // h), 3, axis=-2)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
        if self.causal:
            mask = jnp.tril(jnp.ones((seq, seq), bool))
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, seq, d)
        return self.out(context)


class ReversibleTransformerBlock(RevBlock):
    """A reversible pre-norm transformer block on ``(batch, seq, 2 * d_model)``.

    The input's last axis holds two streams ``x1, x2`` of width ``d_model``:
    ``y1 = x1 + Attention(LayerNorm(x2))`` and ``y2 = x2 + MLP(LayerNorm(y1))``, output
    ``concatenate([y1, y2], -1)``. It is a ``RevBlock`` whose two side
    branches are the attention and the MLP, so it is exactly invertible
    (``x2 = y2 - MLP(LN(y1))``, ``x1 = y1 - Attention(LN(x2))``) and volume preserving,
    and activations need not be stored (Reformer, Rev-ViT).

    Args:
      d_model: width of each stream (the input has ``2 * d_model`` features).
      num_heads: attention heads (must divide ``d_model``).
      rngs: random streams.
      mlp_ratio: hidden width of the MLP is ``mlp_ratio * d_model``.
      causal: causal attention mask.
      param_dtype: dtype of the parameters.

    Example:
      >>> block = ReversibleTransformerBlock(8, 2, rngs=nnx.Rngs(0))
      >>> block(jnp.ones((2, 5, 16))).shape
      (2, 5, 16)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: int = 4,
        causal: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        attention = nnx.Sequential(
            nnx.LayerNorm(d_model, **kw),
            SelfAttention(d_model, num_heads, causal=causal, **kw),
        )
        mlp = nnx.Sequential(
            nnx.LayerNorm(d_model, **kw),
            MLP(d_model, mlp_ratio * d_model, d_model, **kw),
        )
        super().__init__(2 * d_model, attention, mlp)


class ReversibleTransformer(Invertible):
    """``depth`` ``ReversibleTransformerBlock``\\ s, stacked and scanned.

    Maps ``(batch, seq, 2 * d_model)`` to the same shape; exactly invertible and volume
    preserving. Put an embedding before it (e.g. duplicate a ``d_model`` embedding into
    both streams) and a head after it (e.g. average the two streams).

    Args:
      d_model: width of each stream.
      num_heads: attention heads.
      depth: number of blocks.
      rngs: random streams.
      mlp_ratio: hidden width ratio of the MLPs.
      causal: causal attention mask.
      param_dtype: dtype of the parameters.

    Example:
      >>> model = ReversibleTransformer(8, 2, depth=4, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 5, 16))
      >>> model.inverse(model(x)).shape
      (2, 5, 16)
    """

    volume_preserving = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        depth: int = 2,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: int = 4,
        causal: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.d_model = d_model

        def block(r: nnx.Rngs) -> ReversibleTransformerBlock:
            return ReversibleTransformerBlock(
                d_model,
                num_heads,
                rngs=r,
                mlp_ratio=mlp_ratio,
                causal=causal,
                param_dtype=param_dtype,
            )

        self.blocks = Stack(block, depth, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.blocks(x)

    def inverse(self, y: jax.Array) -> jax.Array:
        return self.blocks.inverse(y)
