"""SwiGLU feed-forward: the dense layers' MLP and the MoE's shared expert."""

from __future__ import annotations

import jax
from flax import nnx

from glmjax.model.layers import Linear
from glmjax.model.options import ModelOptions
from glmjax.sharding import constrain


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); x [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int, opts: ModelOptions, *, std: float, axis: str = "mlp",
                 rngs: nnx.Rngs):
        kw = dict(std=std, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.gate_proj = Linear((dim,), (hidden,), ("embed", axis), **kw)
        self.up_proj = Linear((dim,), (hidden,), ("embed", axis), **kw)
        self.down_proj = Linear((hidden,), (dim,), (axis, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if h.ndim == 3:  # [B,T,hidden]: stated, else XLA may split the tokens and gather hidden instead
            h = constrain(h, ("batch", "seq", "act_mlp"))
        return self.down_proj(h)
