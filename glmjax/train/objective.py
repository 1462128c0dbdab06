"""The training objective of one batch: LM cross-entropy, MTP steps, the DSA indexer's KL, MoE balance.

    loss = lm + (mtp_weight / S) * sum_s mtp_s + mtp_tv_weight * mtp_tv + indexer_weight * indexer_kl
           + balance_weight * balance

(S = mtp_steps; DeepSeek-V3's lambda / D weighting of the D steps.)

- lm: next-token cross-entropy, mean over the tokens that have a next token in their document, plus
  z_loss * logsumexp^2 (chunked over the sequence: never [T, V] logits).
- mtp_s (s = 0 .. mtp_steps-1): the MTP layer's step s predicts token j+2+s at row j (model/mtp.py: the
  first step's top-k and KV are reused by later steps); mean cross-entropy over rows whose tokens j..j+2+s
  share a document.
- mtp_tv (loss.mtp_tv_weight > 0): 1 - E[accepted] / S, E[accepted] = sum_s prod_{i<=s} alpha_i the expected
  drafts a verification accepts, alpha_s = sum_x min(p, q_s) at each row (p: the main model's distribution
  for the same token, detached; losses.chunked_acceptance), averaged over rows with a first draft.
- indexer_kl: per full layer (and the MTP layer's), sum over queries of KL(p || softmax(indexer scores)) at
  the selected keys, p the head-summed attention of every layer sharing the selection (IndexShare),
  L1-normalised; divided by the number of queries; averaged over those layers. Its gradient reaches only
  the indexers (their inputs are detached), and the LM loss sends them none.
- balance: DeepSeek-V3's sequence-wise balance loss, per MoE layer and sequence
  sum_e f_e P_e with f_e = E / (k T_b) * (tokens of sequence b routed to e), P_e = the sequence's mean
  normalised router score; averaged over layers and sequences. The router's correction bias is updated
  outside the gradient (glmjax.train.balance).

Every term is returned on its own for logging.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from glmjax.model.context import to_model_order
from glmjax.model.moe import MoEStats
from glmjax.model.transformer import GlmMoeDsa
from glmjax.train.config import LossConfig
from glmjax.train.losses import chunked_acceptance, chunked_cross_entropy, expected_accepted, shift_rows


def shifted_labels(input_ids: jax.Array, segment_ids: jax.Array, offset: int) -> tuple[jax.Array, jax.Array]:
    """input_ids, segment_ids [B,T] -> (labels [B,T] = input_ids[:, j+offset], weights [B,T] float32): weight 1
    where tokens j .. j+offset all lie in token j's document (segment id != 0), else 0 (label 0)."""
    B, T = input_ids.shape
    same = segment_ids != 0
    for k in range(1, offset + 1):
        nxt = jnp.concatenate([segment_ids[:, k:], jnp.zeros((B, min(k, T)), segment_ids.dtype)], axis=1)[:, :T]
        same = same & (nxt == segment_ids)
    labels = jnp.concatenate([input_ids[:, offset:], jnp.zeros((B, min(offset, T)), input_ids.dtype)], axis=1)[:, :T]
    return jnp.where(same, labels, 0).astype(jnp.int32), same.astype(jnp.float32)


class Terms(NamedTuple):
    """Loss terms (float32 scalars) and what the step needs beyond them.

    loss: the weighted total; lm, z (the z-loss part of lm), mtp [S], indexer_kl, balance: the terms;
    lm_tokens: tokens with an LM label; mtp_accuracy [S]: top-1 accuracy of each MTP step; mtp_accepted:
    expected drafts accepted per verification (the TV loss's measure; None when it is off); moe_load
    [Lm, E] and mtp_moe_load [S, E] (or None): assignments per expert (the bias update's input)."""

    loss: jax.Array
    lm: jax.Array
    mtp: jax.Array
    mtp_accuracy: jax.Array
    mtp_accepted: jax.Array | None
    indexer_kl: jax.Array
    balance: jax.Array
    lm_tokens: jax.Array
    moe_load: jax.Array | None
    mtp_moe_load: jax.Array | None


def balance_loss(stats: MoEStats, num_experts: int, top_k: int) -> jax.Array:
    """stats with seq_load / seq_score [L, B, E] -> mean over layers and sequences of sum_e f_e P_e."""
    tokens = jnp.sum(stats.seq_load, axis=-1, keepdims=True) / top_k  # [L, B, 1]
    f = num_experts * stats.seq_load / (top_k * jnp.maximum(tokens, 1.0))
    per_seq = jnp.sum(jax.lax.stop_gradient(f) * stats.seq_score, axis=-1)  # [L, B]
    has = tokens[..., 0] > 0
    return jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def _mean_kl(kl: jax.Array, n: jax.Array) -> jax.Array:
    per_layer = kl / jnp.maximum(n, 1.0)
    has = n > 0
    return jnp.sum(jnp.where(has, per_layer, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def _accuracy(model: GlmMoeDsa, hidden: jax.Array, labels: jax.Array, weights: jax.Array, chunk: int) -> jax.Array:
    """Top-1 accuracy over weighted rows, chunked over the sequence like the loss (no gradient)."""
    hidden, labels, weights = (jax.lax.stop_gradient(a) for a in (hidden, labels, weights))
    B, T, D = hidden.shape
    c = min(chunk, T)
    while T % c:
        c -= 1

    def step(total, xs):
        h, y, w = xs
        hit = jnp.argmax(model.head(h), axis=-1) == y
        return total + jnp.sum(jnp.where(hit, w, 0.0)), None

    split = lambda a: jnp.moveaxis(a.reshape(B, T // c, c, *a.shape[2:]), 1, 0)  # noqa: E731
    hits, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(hidden), split(labels), split(weights)))
    return hits / jnp.maximum(jnp.sum(weights), 1.0)


def objective(model: GlmMoeDsa, input_ids: jax.Array, segment_ids: jax.Array, cfg: LossConfig,
              stage: str) -> Terms:
    """input_ids, segment_ids [B,T] int32 (natural order; segment 0 = padding) -> Terms."""
    mc = model.config
    steps = cfg.mtp_steps if len(model.mtp) else 0
    out = model.backbone(input_ids, segment_ids=segment_ids, mtp_steps=steps)
    cp = model.context_size()
    to_model = lambda a: to_model_order(a, cp)  # noqa: E731

    labels, w = map(to_model, shifted_labels(input_ids, segment_ids, 1))
    lm_sum, lm_n = chunked_cross_entropy(model.head, out.hidden, labels, w, chunk=cfg.loss_chunk, z_loss=cfg.z_loss)
    lm = lm_sum / jnp.maximum(lm_n, 1.0)

    mtp, acc, alphas, step_weights = [], [], [], []
    for s, h in enumerate(out.mtp_hidden):
        y, ws = map(to_model, shifted_labels(input_ids, segment_ids, 2 + s))
        total, n = chunked_cross_entropy(model.head, h, y, ws, chunk=cfg.loss_chunk)
        mtp.append(total / jnp.maximum(n, 1.0))
        acc.append(_accuracy(model, h, y, ws, cfg.loss_chunk))
        if cfg.mtp_tv_weight:
            # Draft s at row j proposes token j+2+s; the target's distribution for it is at row j+1+s.
            alphas.append(chunked_acceptance(model.head, h, shift_rows(out.hidden, 1 + s, cp), chunk=cfg.loss_chunk))
            step_weights.append(ws)
    mtp = jnp.stack(mtp) if mtp else jnp.zeros((0,), jnp.float32)
    acc = jnp.stack(acc) if acc else jnp.zeros((0,), jnp.float32)

    accepted, tv = None, jnp.zeros((), jnp.float32)
    if alphas:
        total, rows = expected_accepted(alphas, step_weights)
        accepted = total / jnp.maximum(rows, 1.0)
        tv = 1.0 - accepted / len(alphas)

    kl, n = out.aux.indexer_kl, out.aux.indexer_tokens
    if out.mtp_aux is not None:
        kl, n = jnp.concatenate([kl, out.mtp_aux.indexer_kl[:1]]), jnp.concatenate([n, out.mtp_aux.indexer_tokens[:1]])
    indexer = _mean_kl(kl, n) if kl.size else jnp.zeros((), jnp.float32)

    stats = [a.moe for a in (out.aux, out.mtp_aux) if a is not None and a.moe is not None]
    if stats:
        joined = jax.tree.map(lambda *x: jnp.concatenate(x), *stats)
        balance = balance_loss(joined, mc.n_routed_experts, mc.num_experts_per_tok)
    else:
        balance = jnp.zeros((), jnp.float32)

    if stage == "dense_warmup":  # only the indexers train: their KL is the objective
        loss = cfg.indexer_weight * indexer
    else:
        loss = lm + cfg.mtp_weight * jnp.mean(mtp) + cfg.balance_weight * balance if mtp.size else \
            lm + cfg.balance_weight * balance
        loss = loss + cfg.mtp_tv_weight * tv
        if stage == "sparse":
            loss = loss + cfg.indexer_weight * indexer
    return Terms(loss, lm, mtp, acc, accepted, indexer, balance, lm_n,
                 None if out.aux.moe is None else out.aux.moe.load,
                 None if out.mtp_aux is None or out.mtp_aux.moe is None else out.mtp_aux.moe.load)
