"""The multi-token-prediction (MTP) layer (stored as model.layers.{num_hidden_layers + i}).

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
from glmjax.model.attention import SequenceInfo
from glmjax.model.decoder import DecoderLayer, LayerKind
from glmjax.model.layers import Linear, RMSNorm
from glmjax.model.options import ModelOptions


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

    def __call__(self, next_embeds: jax.Array, h: jax.Array, info: SequenceInfo) -> tuple[jax.Array, jax.Array]:
        """next_embeds [B,T',D] = embed(t[j+1]), h [B,T',D] -> (decoder output [B,T',D] before the head norm,
        shared_head.norm of it, ready for the main lm_head)."""
        x = self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(h)], axis=-1))
        out, _ = self.decoder(x, info, None)
        return out, self.shared_head.norm(out)
