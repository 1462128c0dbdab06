"""Basic layers with logical axis names: Linear, Embed, RMSNorm, LayerNorm.

Every parameter carries `logical_axes` metadata (one name per dimension); `glmjax.sharding` maps those names
to mesh axes. Weights are stored [in, out] (torch Linear stores [out, in]; the checkpoint code transposes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.sharding import gathered


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, std: float | None = None, fill: float = 0.0) -> nnx.Param:
    """A parameter with logical axis names: normal(std) when std is given, else the constant `fill`."""
    assert len(axes) == len(shape), (shape, axes)
    if std is not None:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, fill, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """x @ W with W [*in_shape, *out_shape]: contracts the trailing len(in_shape) dims of x.

    Multi-dim in/out shapes keep heads as their own axis (e.g. q_b_proj [q_lora, heads, qk_head_dim]) so the
    head axis can be sharded and no reshape sits between the matmul and attention."""

    def __init__(self, in_shape, out_shape, axes, *, std, dtype, param_dtype, rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.weight = param(rngs, in_shape + out_shape, axes, param_dtype, std=std)

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        w = gathered(self.weight, self.dtype)
        n = self.n_in
        dims = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), w.astype(self.dtype), (dims, ((), ())), preferred_element_type=jnp.float32
        )
        return y.astype(out_dtype or self.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.weight = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype, std=std)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(gathered(self.weight, self.dtype), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x @ embedding.T, float32 logits."""
        w = gathered(self.weight, x.dtype)
        return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """transformers' RMSNorm: normalize in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, *, axis: str = "norm", param_dtype):
        self.eps = eps
        self.weight = param(None, (dim,), (axis,), param_dtype, fill=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * y.astype(x.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (the indexer's k_norm), computed in float32."""

    def __init__(self, dim: int, eps: float, *, axis: str = "norm", param_dtype):
        self.eps = eps
        self.weight = param(None, (dim,), (axis,), param_dtype, fill=1.0)
        self.bias = param(None, (dim,), (axis,), param_dtype, fill=0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
