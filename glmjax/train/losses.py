"""Language-model losses that never build [B, T, V] logits.

At 128K tokens per sequence and GLM-5.2's 154,880-token vocabulary, float32 logits are 81 GB per sequence.
`chunked_cross_entropy` computes them one sequence chunk at a time inside a rematerialised scan, so the
forward keeps one chunk's logits and the backward recomputes them chunk by chunk.

Under context parallelism the sequence axis is split over devices: the chunks are taken within each
device's own part of the sequence ([B, T] -> [B, shards, T/shards]), so every device works on its own
tokens at every step and no chunk has to move.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from glmjax import sharding
from glmjax.sharding import constrain


def chunked_cross_entropy(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                          weights: jax.Array, *, chunk: int = 2048, z_loss: float = 0.0
                          ) -> tuple[jax.Array, jax.Array]:
    """Sum over tokens of weights * (-log p(label) + z_loss * logsumexp**2), and the sum of weights.

    head: [B, c, D] -> [B, c, V] float32 logits (the model's `head`); hidden [B, T, D]; labels [B, T] int32;
    weights [B, T] float32 (0 for tokens without a label). The sequence splits into the context shards of
    the current mesh, then into chunks of at most `chunk` tokens per shard (it must divide the shard)."""
    B, T, D = hidden.shape
    mesh = sharding.current_mesh()
    cp = sharding.mesh_size(sharding.mesh_axes("seq", mesh), mesh)
    per_shard = T // cp
    c = min(chunk, per_shard)
    if per_shard % c:
        raise ValueError(f"chunked_cross_entropy: chunk {c} must divide the per-shard sequence length {per_shard}")
    n = per_shard // c

    def split(a):  # [B, T, ...] -> [n, B, cp, c, ...] with cp still over the context axes
        a = a.reshape(B, cp, n, c, *a.shape[2:])
        a = constrain(a, ("batch", "seq") + (None,) * (a.ndim - 2))
        return jnp.moveaxis(a, 2, 0)

    @jax.checkpoint
    def step(carry, xs):
        h, y, w = xs  # [B, cp, c, D], [B, cp, c], [B, cp, c]
        logits = head(h.reshape(B, cp * c, D)).reshape(B, cp, c, -1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        loss = (lse - picked + z_loss * jnp.square(lse)) * w
        return carry + jnp.sum(loss), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                            (split(hidden), split(labels), split(weights.astype(jnp.float32))))
    return total, jnp.sum(weights.astype(jnp.float32))
