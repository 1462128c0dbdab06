"""The serving engine's device programs, each one jitted function of static shape; the host only schedules.

- `prefill`: one chunk of the prompts of R requests into their slots (target layers, and the MTP layer's
  rows when drafting); a prompt's last chunk samples its first token and drafts from it.
- `decode`: one token for every slot.
- `speculative`: verify every slot's k drafts in one target forward, accept per row (greedy prefix match or
  lossless rejection sampling), roll back by lengths, then draft the next k with the MTP layer: its first step
  over the rows just verified (writing the MTP cache, running its indexer), later steps reusing that step's
  top-k (IndexShare) and KV (KVShare).

State per slot (`SlotState`): the cache length (target and MTP caches hold the same rows: MTP row j needs
target hidden state j and token j + 1, and both exist once token j + 1 has been verified), the pending token
(emitted, not yet in the cache), how many tokens the request has emitted (the position its randomness is keyed
on), and the drafts for the next verification.

Shapes: B slots, k drafts, V vocabulary, C prefill chunk, R requests prefilled together.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from glmjax.model.transformer import GlmMoeDsa
from glmjax.serve.forward import mtp_draft_step, mtp_forward, target_forward
from glmjax.serve.kv_cache import KVCache, Rows
from glmjax.serve.sampling import (
    DRAFT_STREAM,
    TARGET_STREAM,
    SamplingArrays,
    argmax,
    rejection_accept,
    sample,
    target_probs,
)


class SlotState(NamedTuple):
    """length [B] int32: rows in the cache; pending [B] int32: the last emitted token (not in the cache yet);
    emitted [B] int32: tokens the request has emitted, pending included; drafts [B,k] int32 and draft_probs
    [B,k,V] float32 (None unless drafts are sampled): the next tokens proposed by the MTP layer; sampling:
    SamplingArrays of each slot's request."""

    length: jax.Array
    pending: jax.Array
    emitted: jax.Array
    drafts: jax.Array
    draft_probs: jax.Array | None
    sampling: SamplingArrays


def init_state(slots: int, k: int, vocab: int, sampled_drafts: bool) -> SlotState:
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    sampling = SamplingArrays(jnp.zeros((slots,), jnp.float32), zeros(), jnp.ones((slots,), jnp.float32),
                              jnp.zeros((slots, 2), jnp.uint32))
    return SlotState(zeros(), zeros(), zeros(), jnp.zeros((slots, k), jnp.int32),
                     jnp.zeros((slots, k, vocab), jnp.float32) if sampled_drafts and k else None, sampling)


def _row(x: jax.Array, i: jax.Array) -> jax.Array:
    """x [B,T,...], i [B] -> [B,1,...]: row i[b] of each b."""
    return jnp.take_along_axis(x, i.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def _choose(model: GlmMoeDsa, normed: jax.Array, s: SamplingArrays, position: jax.Array, sampled: bool):
    """A draft from MTP hidden states normed [B,1,D] at output position [B] -> (token [B], q [B,V] or None)."""
    logits = model.head(normed)
    if not sampled:
        return argmax(logits[:, 0]), None
    q = target_probs(logits, s)
    return sample(q, s, position[:, None], DRAFT_STREAM)[:, 0], q[:, 0]


def draft(model: GlmMoeDsa, cache: KVCache, first, last: jax.Array, state: SlotState, k: int, sampled: bool,
          slots: jax.Array | None = None):
    """k drafts after the MTP layer's first step `first` (MTPStep over T rows): row last[b] is the slot's
    newest verified row; state holds the new lengths and emitted counts of the rows (cache slots `slots`, None:
    all). Steps 1.. run in a scan (one MTP layer in the program, whatever k). -> (drafts [B,k], q [B,k,V] or
    None)."""
    out, topk, normed = _row(first.out, last), _row(first.topk, last), _row(first.normed, last)
    tok, q = _choose(model, normed, state.sampling, state.emitted, sampled)
    if k == 1:
        return tok[:, None], (None if q is None else q[:, None])

    def later(carry, s):
        tok, out = carry
        step = mtp_draft_step(model, cache, tok[:, None], out, topk, state.length, s, slots)
        tok, q = _choose(model, step.normed, state.sampling, state.emitted + s, sampled)
        return (tok, step.out), (tok, q)

    _, (toks, qs) = jax.lax.scan(later, (tok, out), jnp.arange(1, k, dtype=jnp.int32))
    drafts = jnp.concatenate([tok[:, None], toks.T], axis=1)
    if not sampled:
        return drafts, None
    return drafts, jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)


def prefill(model: GlmMoeDsa, cache: KVCache, state: SlotState, slots: jax.Array, tokens: jax.Array,
            next_tokens: jax.Array, start: jax.Array, count: jax.Array, last: jax.Array,
            sampling: SamplingArrays, *, k: int, sampled_drafts: bool):
    """One prompt chunk of each of R requests: row r is the request in cache slot slots[r], tokens
    [R,C] at positions start[r].., count[r] of them real; next_tokens [R,C]: each token's successor in the
    prompt (for the MTP rows; after the prompt's last token comes the first sampled one). last [R] bool: the
    row is its prompt's final chunk: the slot's state is set (first token sampled, drafts made) only then. A
    row with nothing to prefill (a prompt done in an earlier chunk, or padding, which may name another row's
    slot) has count 0, last False and start at the cache's end, so none of its rows are written; the rows
    with a chunk have distinct slots. sampling: the requests' SamplingArrays ([R] rows). One
    program per R, whatever the chunk. -> (cache, state, first tokens [R])."""
    R = tokens.shape[0]
    rows = Rows(slots, start, count)
    cache, hidden = target_forward(model, cache, tokens, rows)
    end = jnp.maximum(count - 1, 0)
    probs = target_probs(model.head(_row(hidden, end)), sampling)
    first_token = sample(probs, sampling, jnp.zeros((R, 1), jnp.int32), TARGET_STREAM)[:, 0]
    row = SlotState(start + count, first_token, jnp.ones((R,), jnp.int32), state.drafts[slots],
                    None if state.draft_probs is None else state.draft_probs[slots], sampling)
    if k:
        r = jnp.arange(R)
        nxt = jnp.where(last, first_token, next_tokens[r, end])
        cache, first = mtp_forward(model, cache, next_tokens.at[r, end].set(nxt), hidden, rows)
        drafts, q = draft(model, cache, first, end, row, k, sampled_drafts, rows.slots)
        row = row._replace(drafts=drafts, draft_probs=q)
    # Only final chunks set their slot's state; the other rows' writes go out of bounds and are dropped.
    target = jnp.where(last, slots, state.length.shape[0])
    state = jax.tree.map(lambda a, r: a.at[target].set(r, mode="drop"), state, row)
    return cache, state, first_token


def decode(model: GlmMoeDsa, cache: KVCache, state: SlotState, active: jax.Array):
    """One token per slot (active [B] bool; inactive slots run as padding and keep their state).
    -> (cache, state, tokens [B,1], accepted drafts [B] (zeros))."""
    rows = Rows(None, state.length, active.astype(jnp.int32))
    cache, hidden = target_forward(model, cache, state.pending[:, None], rows)
    probs = target_probs(model.head(hidden), state.sampling)
    tok = sample(probs, state.sampling, state.emitted[:, None], TARGET_STREAM)
    state = state._replace(length=state.length + active, pending=jnp.where(active, tok[:, 0], state.pending),
                           emitted=state.emitted + active)
    return cache, state, tok, jnp.zeros_like(state.length)


def speculative(model: GlmMoeDsa, cache: KVCache, state: SlotState, active: jax.Array, *, k: int,
                sampled_drafts: bool):
    """Verify the k drafts of every active slot, accept, and draft anew.
    -> (cache, state, tokens [B,k+1] (the first accepted + 1 are emitted), accepted drafts [B])."""
    tokens = jnp.concatenate([state.pending[:, None], state.drafts], axis=1)  # [B,k+1]
    rows = Rows(None, state.length, jnp.where(active, k + 1, 0))
    cache, hidden = target_forward(model, cache, tokens, rows)
    p = target_probs(model.head(hidden), state.sampling)
    positions = state.emitted[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    accepted, out = rejection_accept(state.drafts, state.draft_probs, p, state.sampling, positions)
    accepted = jnp.where(active, accepted, 0).astype(jnp.int32)
    step = active.astype(jnp.int32) * (accepted + 1)
    new = state._replace(length=state.length + step, emitted=state.emitted + step,
                         pending=jnp.where(active, _row(out, accepted)[:, 0], state.pending))
    # The MTP rows of the verified tokens: row i takes target hidden i and token i + 1, which is out[i] for
    # every i <= accepted (an accepted draft equals out there; out[accepted] is the correction or bonus).
    cache, first = mtp_forward(model, cache, out, hidden, Rows(None, state.length, step))
    drafts, q = draft(model, cache, first, accepted, new, k, sampled_drafts)
    new = new._replace(drafts=jnp.where(active[:, None], drafts, state.drafts),
                       draft_probs=None if q is None else jnp.where(active[:, None, None], q, state.draft_probs))
    return cache, new, out, accepted
