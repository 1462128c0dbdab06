"""Token sampling and speculative-decoding acceptance for the serving engine.

Everything here is pure JAX with static shapes, vectorised over batch rows (one row per batch slot), and meant
to be traced inside the engine's jitted step (only the host helper sampling_arrays jits by itself). Each row
carries its own sampling parameters (`SamplingArrays`), so greedy and sampled requests share one batch.

Randomness is a function of (request seed, output position, stream) only: the key for a draw is
fold_in(fold_in(seed key, position), stream). A request's output therefore does not depend on its batch slot
or on the other requests in the batch. It also keeps speculative decoding lossless across rounds: a position
is emitted by exactly one round, and the draws a round made for positions after its first rejection were never
observed, so re-drawing them in the next round is still fresh randomness.

Valid ranges (checked by the request parser, not here): temperature >= 0 and finite (0 = greedy); top_k >= 0
(0, or anything >= V, = no limit); 0 < top_p <= 1 (1 = no limit); seeds are Python ints, taken modulo 2**32
(which is what jax.random.key does without x64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Stream ids separating the independent uses of one (seed, position); the engine may use others.
TARGET_STREAM, DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 0, 1, 2, 3


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters as arrays (one row per batch slot)."""

    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = no top-k limit
    top_p: jax.Array  # [B] float32 in (0, 1]; 1 = no nucleus limit
    key: jax.Array  # [B, 2] uint32 raw PRNG key data per request (jax.random.key_data of PRNGKey(seed))


@jax.jit
def _seed_key_data(seeds: jax.Array) -> jax.Array:
    """[B] uint32 seeds -> [B, 2] uint32 raw key data, as jax.random.key_data(jax.random.PRNGKey(seed))."""
    return jax.vmap(lambda seed: jax.random.key_data(jax.random.key(seed)))(seeds)


def sampling_arrays(temperature: Sequence[float] | np.ndarray, top_k: Sequence[int] | np.ndarray,
                    top_p: Sequence[float] | np.ndarray, seeds: Sequence[int] | np.ndarray) -> SamplingArrays:
    """Host helper: per-row parameters (Python lists or numpy, length B each) -> SamplingArrays on device.
    Seeds are reduced modulo 2**32, which gives the same key as jax.random.PRNGKey(seed) without x64."""
    seeds32 = np.array([int(s) % 2**32 for s in seeds], np.uint32)  # one vectorised key derivation, no per-seed calls
    return SamplingArrays(temperature=jnp.asarray(np.asarray(temperature, np.float32)),
                          top_k=jnp.asarray(np.asarray(top_k, np.int32)),
                          top_p=jnp.asarray(np.asarray(top_p, np.float32)),
                          key=_seed_key_data(jnp.asarray(seeds32)))


def argmax(x: jax.Array) -> jax.Array:
    """int32 index of the maximum over the last axis, the lowest on ties (as jnp.argmax). Two plain reductions:
    XLA:CPU runs jnp.argmax's (value, index) reduce about 5x slower at a vocabulary of 2K-8K."""
    V = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1)  # NaN rows (no element equals the max) get the last id, not V


def _row_keys(key_data: jax.Array, positions: jax.Array, stream: int | jax.Array) -> jax.Array:
    """key_data [B, 2] uint32, positions [B, T] int32 -> typed keys [B, T] for (row seed, position, stream)."""
    base = jax.random.wrap_key_data(key_data)  # [B] typed keys

    def one(k: jax.Array, pos: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(k, pos), stream)

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(base, positions)


def _filter_logits(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p on temperature-scaled logits z [B, T, V]; dropped tokens become -inf.

    One descending sort serves both filters: the kept set is always a prefix of the sorted order, so it is
    described by a threshold logit and applied as `z >= threshold`. Tokens tied with the threshold are all kept
    (so top-k may keep more than k tokens, and top-p slightly more mass, only when logits tie exactly).
    """
    V = z.shape[-1]
    zs = -jnp.sort(-z, axis=-1)  # descending
    k = jnp.where((top_k <= 0) | (top_k > V), V, top_k)[:, None, None]  # [B,1,1]; 0 or > V = no limit
    kth = jnp.take_along_axis(zs, jnp.broadcast_to(k - 1, zs.shape[:-1] + (1,)), axis=-1)  # [B,T,1]
    in_k = zs >= kth
    ps = jax.nn.softmax(jnp.where(in_k, zs, -jnp.inf), axis=-1)  # sorted probabilities after top-k
    mass_before = jnp.cumsum(ps, axis=-1) - ps  # exclusive cumulative mass; 0 for the top token, so it stays
    tp = top_p[:, None, None]
    # top_p >= 1 is exempt so float rounding of the cumulative sum can never drop tail tokens.
    keep = in_k & ((mass_before < tp) | (tp >= 1.0))
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)  # >= 1: a prefix of the sorted order
    threshold = jnp.take_along_axis(zs, n_keep - 1, axis=-1)
    return jnp.where(z >= threshold, z, -jnp.inf)


def target_probs(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """logits [B, T, V] -> probabilities [B, T, V] float32 of the distribution each row samples from.

    Temperature scaling, then top-k, then top-p (the smallest set of most likely tokens whose mass >= top_p,
    always at least the top token), renormalised. Greedy rows (temperature 0) get a one-hot at the argmax
    (ties: lowest id, as jnp.argmax). Ties at the top-k / top-p threshold keep every tied token.
    """
    logits = logits.astype(jnp.float32)
    one_hot = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)

    def mixed(logits):
        greedy = (s.temperature <= 0)[:, None, None]
        z = logits / jnp.where(greedy, 1.0, s.temperature[:, None, None])  # avoid dividing greedy rows by 0
        # The sort is the expensive part at a real vocabulary size: skip it when no row filters.
        filtering = jnp.any((s.top_k > 0) | (s.top_p < 1.0))
        z = jax.lax.cond(filtering, _filter_logits, lambda z, *_: z, z, s.top_k, s.top_p)
        return jnp.where(greedy, one_hot, jax.nn.softmax(z, axis=-1))

    # All rows greedy (the common serving batch): no softmax over the vocabulary.
    return jax.lax.cond(any_sampled(s), mixed, lambda _: one_hot, logits)


def any_sampled(s: SamplingArrays) -> jax.Array:
    """[] bool: some row samples (temperature > 0). The all-greedy case skips random draws and vocabulary-wide
    work behind lax.cond."""
    return jnp.any(s.temperature > 0)


def sample(probs: jax.Array, s: SamplingArrays, positions: jax.Array, stream: int) -> jax.Array:
    """probs [B, T, V], positions [B, T] int32 -> tokens [B, T] int32.

    `positions` is the index of each token being sampled within its request's output, so a draw depends only
    on (seed, position, stream). `stream` separates independent uses (see the *_STREAM constants); a Python int
    or a traced int32 scalar. Greedy rows take the argmax. Sampling uses the Gumbel-max trick
    (jax.random.categorical): exact, at the cost of V random numbers per token.
    """
    best = argmax(probs)

    def draw(probs):
        keys = _row_keys(s.key, positions, stream)
        logp = jnp.log(probs.astype(jnp.float32))  # log 0 = -inf: never drawn
        drawn = jax.vmap(jax.vmap(jax.random.categorical))(keys, logp)
        return jnp.where((s.temperature <= 0)[:, None], best, drawn).astype(jnp.int32)

    return jax.lax.cond(any_sampled(s), draw, lambda _: best, probs)


def _leading_true(mask: jax.Array) -> jax.Array:
    """mask [B, k] bool -> [B] int32, the number of leading True entries of each row."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _emit(drafts: jax.Array, accepted: jax.Array, fill: jax.Array) -> jax.Array:
    """drafts [B, k], accepted [B], fill [B, k+1] -> [B, k+1]: drafts before `accepted`, `fill` from there on."""
    idx = jnp.arange(drafts.shape[1] + 1)[None, :]
    padded = jnp.concatenate([drafts, fill[:, -1:]], axis=1)
    return jnp.where(idx < accepted[:, None], padded, fill).astype(jnp.int32)


def greedy_accept(drafts: jax.Array, target_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """drafts [B, k] int32, target_tokens [B, k+1] int32 (the target's argmax at the k+1 verified positions)
    -> (accepted [B] int32: the longest prefix with drafts[:, i] == target_tokens[:, i],
        emitted [B, k+1] int32: drafts[:accepted], then target_tokens[accepted] (correction or bonus token);
        entries after index `accepted` are target_tokens)."""
    k = drafts.shape[1]
    accepted = _leading_true(drafts == target_tokens[:, :k])
    return accepted, _emit(drafts, accepted, target_tokens)


def rejection_accept(drafts: jax.Array, draft_probs: jax.Array | None, target_probs: jax.Array,
                     s: SamplingArrays, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lossless speculative rejection sampling (Leviathan et al. 2022; Chen et al. 2023), per row.

    drafts [B, k] int32; draft_probs [B, k, V] (q, the distribution each draft was drawn from) or None for
    greedy drafts (q one-hot at the draft); target_probs [B, k+1, V] (p, from target_probs()); positions
    [B, k+1] int32, the output positions of the k+1 candidate tokens.

    Draft i is accepted with probability min(1, p_i(x)/q_i(x)); at the first rejection the token is redrawn
    from norm(max(0, p_i - q_i)) and the row stops; if all k are accepted a bonus token is drawn from p_k.
    -> (accepted [B] int32 in [0, k], emitted [B, k+1] int32 as in greedy_accept; entries after index
    `accepted` repeat the emitted token at `accepted` for sampled rows). Greedy rows (temperature 0) return
    exactly greedy_accept(drafts, argmax(p)).
    """
    greedy = greedy_accept(drafts, argmax(target_probs))

    def mixed(p):
        sampled = _rejection_sample(drafts, draft_probs, p, s, positions)
        is_greedy = s.temperature <= 0
        return (jnp.where(is_greedy, greedy[0], sampled[0]), jnp.where(is_greedy[:, None], greedy[1], sampled[1]))

    return jax.lax.cond(any_sampled(s), mixed, lambda _: greedy, target_probs)


def _rejection_sample(drafts, draft_probs, target_probs, s, positions):
    """rejection_accept for rows that sample (same arguments and results)."""
    B, k = drafts.shape
    V = target_probs.shape[-1]
    p = target_probs.astype(jnp.float32)
    if draft_probs is None:
        q = jax.nn.one_hot(drafts, V, dtype=jnp.float32)
    else:
        q = draft_probs.astype(jnp.float32)
    p_x = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_x = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]

    # u < p/q written as u*q < p: no division, and q(x) = 0 accepts only if p(x) > 0.
    u = jax.vmap(jax.vmap(jax.random.uniform))(_row_keys(s.key, positions[:, :k], ACCEPT_STREAM))
    accepted = _leading_true(u * q_x < p_x)

    # The one distribution each row still draws from: the residual at the first rejection, or p_k if none.
    # Padding q with a zero row at index k makes the bonus case the same formula.
    q_pad = jnp.concatenate([q, jnp.zeros((B, 1, V), jnp.float32)], axis=1)
    pick = accepted[:, None, None]
    p_a = jnp.take_along_axis(p, pick, axis=1)[:, 0]  # [B, V]
    q_a = jnp.take_along_axis(q_pad, pick, axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_a)  # all zero only if p == q
    pos_a = jnp.take_along_axis(positions, accepted[:, None], axis=1)  # [B, 1]
    final = sample(residual[:, None], s, pos_a, RESIDUAL_STREAM)[:, 0]  # [B]

    return accepted, _emit(drafts, accepted, jnp.broadcast_to(final[:, None], (B, k + 1)))
