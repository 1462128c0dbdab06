"""Exact top-k by threshold search, without sorting.

`lax.top_k` sorts each row; on TPU that dominates DSA decode (the v5p compiler's static estimate: about
5.5M cycles on [64, 131072] with k = 2048, docs/kernels.md). Here each row's k-th largest value is found
by a 32-step bitwise search on order-preserving integer keys (each step one compare-and-count pass over
the row), then the selected positions are compacted with a cumsum and a scatter. The result equals
`lax.top_k` as a set, ties broken towards the lower index (as lax.top_k does); positions are returned in
increasing order, not by score.

`sharded_topk` is the same search over keys split across devices (a sequence-sharded KV cache): each bit
step's counts are summed over the shards (32 all-reduces of one int32 per row; no scores move), and each
shard keeps its own keys above the final threshold, ties going to the lowest global index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import INVALID_INDEX, match_varying

SIGN = -(2**31)  # int32 with only the sign bit set


def ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys whose signed order is the float order (-0.0 is folded into +0.0)."""
    x = x.astype(jnp.float32)
    # A select, not x + 0.0: XLA's simplifier folds the addition away under jit, and -0.0 would then sort
    # below +0.0 and break ties differently from an eager call.
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.int32)
    # Negative floats: flip the magnitude bits, so a larger magnitude gives a smaller key.
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def kth_largest_key(keys: jax.Array, k: int, shard_axes: tuple[str, ...] = ()) -> jax.Array:
    """keys [..., S] int32 -> [..., 1] the k-th largest key of each row (1 <= k <= S; with shard_axes, of
    the row's keys on every shard, k <= their total).

    Builds the answer bit by bit from the top in the unsigned (offset) domain, where the bit order is the
    key order: candidate c is kept when at least k keys are >= c."""

    def step(i, ans_u):
        cand_u = ans_u | jnp.left_shift(jnp.int32(1), 31 - i)
        count = jnp.sum((keys >= (cand_u ^ SIGN)).astype(jnp.int32), axis=-1, keepdims=True)
        if shard_axes:
            count = jax.lax.psum(count, shard_axes)
        return jnp.where(count >= k, cand_u, ans_u)

    ans_u = jax.lax.fori_loop(0, 32, step, match_varying(jnp.zeros(keys.shape[:-1] + (1,), jnp.int32), keys))
    return ans_u ^ SIGN


def exact_topk(scores: jax.Array, k: int, *, threshold_fn=None) -> jax.Array:
    """scores [..., S] float32 (-inf = not selectable) -> [..., min(k, S)] int32 indices of the k largest,
    ascending; INVALID_INDEX (-1) for slots beyond the number of finite scores in the row.

    threshold_fn(scores [R, S], K) -> [R, 1] int32 k-th largest key: a chip kernel that keeps each row in
    fast memory for the 32 passes (default: the same search in XLA)."""
    S = scores.shape[-1]
    K = min(k, S)
    lead = scores.shape[:-1]
    flat = scores.reshape(-1, S)
    keys = ordered_keys(flat)
    thresh = kth_largest_key(keys, K) if threshold_fn is None else threshold_fn(flat, K)
    above = keys > thresh
    at = keys == thresh
    need = K - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    take = above | (at & (jnp.cumsum(at, axis=-1, dtype=jnp.int32) <= need))
    return _compact(flat, take, K).reshape(*lead, K)


def sharded_topk(scores: jax.Array, k: int, shard_axes: tuple[str, ...]) -> jax.Array:
    """exact_topk over keys split across devices, inside shard_map: scores [..., S] float32 are this shard's
    keys, and the shards along `shard_axes` (in their order, the order of a PartitionSpec entry and of
    lax.axis_index) hold consecutive keys of one row of n * S. -> [..., min(k, S)] int32 *local* indices of
    this shard's share of the global top-min(k, n * S), ascending, INVALID_INDEX in the unused slots.

    The union over shards equals exact_topk of the whole row as a set, ties included (they go to the lowest
    global index). Every shard reserves min(k, S) slots: one shard may hold all of the top k."""
    S = scores.shape[-1]
    n = jax.lax.axis_size(shard_axes)
    K = min(k, n * S)
    lead = scores.shape[:-1]
    flat = scores.reshape(-1, S)
    keys = ordered_keys(flat)
    thresh = kth_largest_key(keys, K, shard_axes)
    above = keys > thresh
    at = keys == thresh
    need = K - jax.lax.psum(jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32), shard_axes)
    # Ties at the threshold are taken in global key order: count those on the shards before this one.
    ties = jax.lax.all_gather(jnp.sum(at, axis=-1, keepdims=True, dtype=jnp.int32), shard_axes)  # [n, R, 1]
    before = jnp.arange(n)[:, None, None] < jax.lax.axis_index(shard_axes)
    earlier = jnp.sum(jnp.where(before, ties, 0), axis=0)
    take = above | (at & (earlier + jnp.cumsum(at, axis=-1, dtype=jnp.int32) <= need))
    return _compact(flat, take, min(K, S)).reshape(*lead, min(K, S))


def _compact(flat: jax.Array, take: jax.Array, width: int) -> jax.Array:
    """The positions of `take` [R, S] in increasing order, in [R, width] int32 slots; INVALID_INDEX for
    unused slots and for taken keys whose score is -inf (rows with fewer finite scores than k)."""
    slot = jnp.where(take, jnp.cumsum(take, axis=-1, dtype=jnp.int32) - 1, width)  # width = dropped
    iota = jnp.broadcast_to(jnp.arange(flat.shape[1], dtype=jnp.int32), flat.shape)
    rows = jnp.broadcast_to(jnp.arange(flat.shape[0])[:, None], flat.shape)
    out = jnp.full((flat.shape[0], width), INVALID_INDEX, jnp.int32).at[rows, slot].set(iota, mode="drop")
    finite = jnp.take_along_axis(flat, jnp.maximum(out, 0), axis=-1) > -jnp.inf
    return jnp.where(finite, out, INVALID_INDEX)
