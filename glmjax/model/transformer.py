"""The GLM-MoE-DSA causal language model (GLM-5, GLM-5.1, GLM-5.2) as a Flax NNX module."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import SequenceInfo
from glmjax.model.decoder import LayerStack, plan_segments
from glmjax.model.layers import Embed, Linear, RMSNorm
from glmjax.model.mtp import MTPLayer
from glmjax.model.options import ModelOptions
from glmjax.model.rope import rope_tables
from glmjax.sharding import constrain


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] final-normed hidden states
    mtp_logits: jax.Array | None  # [B, T-1, V] float32: row j predicts t[j+2] from t[j+1] and hidden[j]


def default_positions(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Positions counted over real tokens (left padding gets position 0), as generate() does."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class GlmMoeDsa(nnx.Module):
    """Embedding, scanned decoder segments, final norm, lm_head, and the MTP layer(s)."""

    def __init__(self, config: GlmMoeDsaConfig, options: ModelOptions | None = None, *, rngs: nnx.Rngs):
        cfg, opts = config, options or ModelOptions()
        D, std = cfg.hidden_size, cfg.initializer_range
        self.config, self.options = cfg, opts
        self.segments = plan_segments(cfg)
        self.embed_tokens = Embed(cfg.vocab_size, D, std=std, dtype=opts.dtype, param_dtype=opts.param_dtype,
                                  rngs=rngs)
        self.stacks = nnx.List([LayerStack(cfg, opts, seg, rngs=rngs) for seg in self.segments])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=opts.param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            (D,), (cfg.vocab_size,), ("embed", "vocab"), std=std, dtype=opts.dtype, param_dtype=opts.param_dtype,
            rngs=rngs)
        self.mtp = nnx.List([MTPLayer(cfg, opts, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

    def sequence_info(self, attention_mask: jax.Array, positions: jax.Array) -> SequenceInfo:
        cos, sin = rope_tables(positions, self.config.rope, self.config.qk_rope_head_dim)
        B, T = positions.shape
        query_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return SequenceInfo(cos, sin, attention_mask.astype(bool), query_index)

    def head(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h, out_dtype=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        """input_ids [B,T] int32; attention_mask [B,T] (1 = real token, left padding allowed);
        positions [B,T] (default: counted over real tokens)."""
        B, T = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        info = self.sequence_info(attention_mask, positions)

        embeds = constrain(self.embed_tokens(input_ids), ("batch", "seq", "act_embed"))
        x = embeds
        for stack in self.stacks:
            x = stack(x, info)
        hidden = self.norm(x)
        logits = self.head(hidden)

        mtp_logits = None
        if len(self.mtp) and T > 1:
            # Row j: token j+1 and hidden j, at position j, over the first T-1 keys.
            mtp_info = SequenceInfo(info.cos[:, :-1], info.sin[:, :-1], info.key_valid[:, :-1],
                                    info.query_index[:, :-1])
            _, normed = self.mtp[0](embeds[:, 1:], hidden[:, :-1], mtp_info)
            mtp_logits = self.head(normed)
        return ModelOutput(logits, hidden, mtp_logits)
