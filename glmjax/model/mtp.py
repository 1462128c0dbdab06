"""The multi-token-prediction (MTP) layer (stored as model.layers.{num_hidden_layers}).

At position j: x = eh_proj(concat[enorm(embed(t[j+1])), hnorm(h[j])]), with h the main model's final-normed
hidden state (or, at a later drafting step, the previous step's decoder output), rope position j; then a
full decoder layer (MLA with its own indexer, MoE); then shared_head.norm and the main model's lm_head.
The MTP layer has no embedding or head of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import Keys, SequenceInfo
from glmjax.model.decoder import DecoderLayer, GroupAux, LayerKind, indexer_kl, remat_layer
from glmjax.model.layers import Linear, RMSNorm
from glmjax.model.options import ModelOptions
from glmjax.sharding import constrain


class SharedHead(nnx.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions):
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=opts.param_dtype)


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
                 keys: Keys | None = None) -> tuple[jax.Array, jax.Array, GroupAux]:
        """next_embeds [B,T,D] = embed(t[j+1]), h [B,T,D] -> (decoder output [B,T,D] before the head norm,
        shared_head.norm of it (ready for the main lm_head), GroupAux of the layer).

        topk / keys: a later draft step's reuse of the first step's selection and KV (see MLAttention)."""
        both = constrain(jnp.concatenate([self.enorm(next_embeds), self.hnorm(h)], axis=-1), ("batch", "seq", None))
        x = constrain(self.eh_proj(both), ("batch", "seq", "act_embed"))
        out, _, attn_aux, stats = remat_layer(self.decoder, self.remat, x, info, topk, keys)
        if attn_aux.probs is not None and attn_aux.index_logits is not None:
            kl, n = indexer_kl([attn_aux.probs], attn_aux.index_logits, info.valid)
        else:
            kl = n = jnp.zeros((), jnp.float32)
        moe = jax.tree.map(lambda a: a[None], stats)
        return out, self.shared_head.norm(out), GroupAux(moe, kl, n)
