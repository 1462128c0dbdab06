"""The multi-token-prediction (MTP) layer (stored as model.layers.{num_hidden_layers}).

At position j: x = eh_proj(concat[enorm(embed(t[j+1])), hnorm(h[j])]), with h the main model's final-normed
hidden state, rope position j; then a full decoder layer (MLA with its own indexer, MoE); then
shared_head.norm and the main model's lm_head. The MTP layer has no embedding or head of its own.

Later steps s = 1, 2, ... (multi-step drafting and its training) run the same layer on embed(t[j+1+s]) and
the previous step's decoder output, at rope position j+s, with the first step's top-k (IndexShare) and KV
(KVShare): row j attends over first-step rows <= j, as a drafter that has verified tokens up to j does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import CacheUpdate, Keys, SequenceInfo
from glmjax.model.decoder import DecoderLayer, GroupAux, LayerKind, group_dense_kl, indexer_kl, remat_layer
from glmjax.model.layers import Linear, RMSNorm
from glmjax.model.options import ModelOptions
from glmjax.sharding import residual


class SharedHead(nnx.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions):
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=opts.param_dtype)


class MTPStep(NamedTuple):
    """One step of the MTP layer. out [B,T,D]: decoder output before the head norm (the next step's h);
    normed [B,T,D]: shared_head.norm(out), ready for the main lm_head; aux: GroupAux of the step; topk
    [B,T,K] and latent [B,T,r+p]: the selection and KV it attended with (what later steps share); keys: the
    updated cache when a cache `update` was given."""

    out: jax.Array
    normed: jax.Array
    aux: GroupAux
    topk: jax.Array
    latent: jax.Array
    keys: Keys | None = None


class MTPLayer(nnx.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=opts.param_dtype)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=opts.param_dtype)
        self.eh_proj = Linear((2 * D,), (D,), ("mtp_in", "embed"), std=cfg.initializer_range, dtype=opts.dtype,
                              param_dtype=opts.param_dtype, rngs=rngs)
        self.decoder = DecoderLayer(cfg, opts, LayerKind("sparse", True), rngs=rngs)
        self.shared_head = SharedHead(cfg, opts)
        self.remat = opts.remat

    def __call__(self, next_embeds: jax.Array, h: jax.Array, info: SequenceInfo, topk: jax.Array | None = None,
                 keys: Keys | None = None, shared: MTPStep | None = None,
                 update: CacheUpdate | None = None) -> MTPStep:
        """next_embeds [B,T,D] = embed(t[j+1]), h [B,T,D] -> MTPStep.

        topk / keys: attend over a given selection / KV cache (see MLAttention.attend). shared: the first
        step of the same tokens; a later step reuses its top-k (IndexShare) and its KV (KVShare), so every
        key it attends to comes from target-model hidden states, as in speculative drafting. update: a KV
        cache's hook (see MLAttention.__call__)."""
        # Both halves keep the residual stream's token split, so eh_proj's weight gradient is a local product
        # plus a reduction (else XLA gathers [T, 2D] activations for it).
        both = residual(jnp.concatenate([self.enorm(residual(next_embeds)), self.hnorm(residual(h))], axis=-1))
        x = residual(self.eh_proj(both))
        shared_latent = None
        if shared is not None:
            topk, shared_latent = shared.topk, shared.latent
        out, topk, attn_aux, stats = remat_layer(self.decoder, self.remat, x, info, topk, keys, shared_latent,
                                                 update)
        if attn_aux.probs is not None and attn_aux.index_logits is not None:
            kl, n = indexer_kl([attn_aux.probs], attn_aux.index_logits, info.valid)
        elif attn_aux.dense is not None and attn_aux.dense.iq is not None:  # dense warm-up, a selecting step
            kl, n = group_dense_kl(self.decoder, [attn_aux.dense], info)
        else:
            kl = n = jnp.zeros((), jnp.float32)
        moe = jax.tree.map(lambda a: a[None], stats)
        latent = attn_aux.latent if shared is None else shared.latent
        return MTPStep(out, self.shared_head.norm(out), GroupAux(moe, kl, n), topk, latent, attn_aux.keys)
