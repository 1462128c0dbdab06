"""Context parallelism: the load-balanced sequence order and the key all-gather.

With a `context` mesh axis of size cp > 1 the sequence is split into 2*cp chunks and shard i holds chunks i
and 2*cp-1-i, so every shard has one early and one late chunk and the causal attention work is even (a
contiguous split would give the last shard cp times the work of the first). The model permutes its inputs
into this "model order" once at entry; every activation between embedding and head stays in it, and
causality uses each token's natural index (`token_index`), never its array position.

Inside attention each shard all-gathers only the small per-token key rows (576-value latent rows, 128-value
indexer keys) and reorders the gathered chunks to natural order, so top-k indices are natural positions;
the all-gather's transpose (a reduce-scatter) is what the backward pass does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def balanced_order(T: int, cp: int) -> np.ndarray:
    """[T] natural token index held at each slot of the model order (identity when cp == 1)."""
    if cp == 1:
        return np.arange(T, dtype=np.int32)
    if T % (2 * cp):
        raise ValueError(f"context parallelism: sequence length {T} must be divisible by 2 * context ({2 * cp})")
    c = T // (2 * cp)
    chunks = [j for i in range(cp) for j in (i, 2 * cp - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks]).astype(np.int32)


@functools.cache
def natural_from_balanced(T: int, cp: int) -> np.ndarray:
    """[T] slot in the model order of each natural index (the inverse permutation)."""
    return np.argsort(balanced_order(T, cp)).astype(np.int32)


def to_model_order(x: jax.Array, cp: int, axis: int = 1) -> jax.Array:
    """Natural order -> model order along `axis`."""
    return x if cp == 1 else jnp.take(x, balanced_order(x.shape[axis], cp), axis=axis)


def to_natural_order(x: jax.Array, cp: int, axis: int = 1) -> jax.Array:
    """Model order -> natural order along `axis`."""
    return x if cp == 1 else jnp.take(x, natural_from_balanced(x.shape[axis], cp), axis=axis)


def gather_natural(x_local: jax.Array, axis_name: str | tuple[str, ...] | None, cp: int) -> jax.Array:
    """Inside shard_map: this shard's [B, T/cp, ...] rows (model order) -> every shard's rows [B, T, ...] in
    natural order. Chunk reordering uses static slices, so it stays a local copy."""
    if cp == 1:
        return x_local
    g = jax.lax.all_gather(x_local, axis_name, axis=1, tiled=True)  # chunks in model order
    c = g.shape[1] // (2 * cp)
    order = balanced_order(2 * cp, cp)  # chunk held at each gathered chunk slot
    slot_of_chunk = np.argsort(order)
    return jnp.concatenate([g[:, s * c:(s + 1) * c] for s in slot_of_chunk], axis=1)
