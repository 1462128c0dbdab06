"""Language-model losses that never build [B, T, V] logits.

At 128K tokens per sequence and GLM-5.2's 154,880-token vocabulary, float32 logits are 81 GB per sequence.
`chunked_cross_entropy` computes them one sequence chunk at a time inside a rematerialised scan, so the
forward keeps one chunk's logits and the backward recomputes them chunk by chunk. A sequence of one chunk
(short training sequences) is not rematerialised: its backward keeps the one chunk's logits, which the
forward builds anyway, and saves recomputing them (a fourth head matmul of the three a step needs).

Under context parallelism the sequence axis is split over devices: the chunks are taken within each
device's own part of the sequence ([B, T] -> [B, shards, T/shards]), so every device works on its own
tokens at every step and no chunk has to move.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from glmjax import sharding
from glmjax.model.context import to_model_order, to_natural_order
from glmjax.sharding import constrain


def _chunks(B: int, T: int, chunk: int, what: str):
    """-> (cp, c, split): the current mesh's context shards, the chunk length within a shard, and
    split: [B, T, ...] -> [n, B, cp, c, ...] (cp still over the context axes)."""
    mesh = sharding.current_mesh()
    cp = sharding.mesh_size(sharding.mesh_axes("seq", mesh), mesh)
    per_shard = T // cp
    c = min(chunk, per_shard)
    if per_shard % c:
        raise ValueError(f"{what}: chunk {c} must divide the per-shard sequence length {per_shard}")
    n = per_shard // c

    def split(a):
        a = a.reshape(B, cp, n, c, *a.shape[2:])
        a = constrain(a, ("batch", "seq") + (None,) * (a.ndim - 2))
        return jnp.moveaxis(a, 2, 0)

    return cp, c, split


def _remat_if_chunked(step, n: int):
    """The scan body, rematerialised when there is more than one chunk (module docstring)."""
    return jax.checkpoint(step) if n > 1 else step


def chunked_cross_entropy(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                          weights: jax.Array, *, chunk: int = 2048, z_loss: float = 0.0
                          ) -> tuple[jax.Array, jax.Array]:
    """Sum over tokens of weights * (-log p(label) + z_loss * logsumexp**2), and the sum of weights.

    head: [B, c, D] -> [B, c, V] float32 logits (the model's `head`); hidden [B, T, D]; labels [B, T] int32;
    weights [B, T] float32 (0 for tokens without a label). The sequence splits into the context shards of
    the current mesh, then into chunks of at most `chunk` tokens per shard (it must divide the shard)."""
    B, T, D = hidden.shape
    cp, c, split = _chunks(B, T, chunk, "chunked_cross_entropy")

    def step(carry, xs):
        h, y, w = xs  # [B, cp, c, D], [B, cp, c], [B, cp, c]
        logits = head(h.reshape(B, cp * c, D)).reshape(B, cp, c, -1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        loss = (lse - picked + z_loss * jnp.square(lse)) * w
        return carry + jnp.sum(loss), None

    total, _ = jax.lax.scan(_remat_if_chunked(step, T // cp // c), jnp.zeros((), jnp.float32),
                            (split(hidden), split(labels), split(weights.astype(jnp.float32))))
    return total, jnp.sum(weights.astype(jnp.float32))


def shift_rows(x: jax.Array, n: int, cp: int) -> jax.Array:
    """x [B, T, ...] in model order -> row j holds natural row j + n (zeros past the end), in model order."""
    nat = to_natural_order(x, cp)
    pad = jnp.zeros((x.shape[0], min(n, x.shape[1])) + x.shape[2:], x.dtype)
    return to_model_order(jnp.concatenate([nat[:, n:], pad], axis=1), cp)


def chunked_acceptance(head: Callable[[jax.Array], jax.Array], draft_hidden: jax.Array, target_hidden: jax.Array,
                       *, chunk: int = 2048) -> jax.Array:
    """alpha [B, T] float32 = sum_x min(p(x), q(x)) per row: q = softmax(head(draft_hidden)), p =
    softmax(head(target_hidden)) with no gradient (the target is what the drafts are judged by). alpha is the
    probability that speculative rejection sampling accepts a draft drawn from q (1 - TV(p, q)). Chunked
    like chunked_cross_entropy: never [T, V] probabilities."""
    B, T, D = draft_hidden.shape
    cp, c, split = _chunks(B, T, chunk, "chunked_acceptance")

    def step(_, xs):
        hq, hp = xs  # [B, cp, c, D] each
        q = jax.nn.softmax(head(hq.reshape(B, cp * c, D)), axis=-1)
        p = jax.lax.stop_gradient(jax.nn.softmax(head(hp.reshape(B, cp * c, D)), axis=-1))
        return None, jnp.sum(jnp.minimum(p, q), axis=-1).reshape(B, cp, c)

    xs = (split(draft_hidden), split(jax.lax.stop_gradient(target_hidden)))
    _, alpha = jax.lax.scan(_remat_if_chunked(step, T // cp // c), None, xs)
    return jnp.moveaxis(alpha, 0, 2).reshape(B, T)  # [n, B, cp, c] -> [B, cp, n, c] -> [B, T]


def expected_accepted(alphas: list[jax.Array], weights: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Expected accepted drafts of multi-step rejection sampling, from the per-step acceptance probabilities.

    alphas[s], weights[s] [B, T]: step s's acceptance probability at each row and whether the row has a
    step-s draft. A row accepts draft s only after drafts 0..s-1, so E[accepted] = sum_s prod_{i<=s} alpha_i
    (a missing step ends the product). -> (sum over rows with a step-0 draft of E[accepted], their count)."""
    run = jnp.ones_like(alphas[0])
    total = jnp.zeros_like(alphas[0])
    for a, w in zip(alphas, weights, strict=True):
        run = run * a * w
        total = total + run
    return jnp.sum(total * weights[0]), jnp.sum(weights[0])
