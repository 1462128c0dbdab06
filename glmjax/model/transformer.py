"""The GLM-MoE-DSA causal language model (GLM-5, GLM-5.1, GLM-5.2) as a Flax NNX module.

Two entry points:
- `backbone(...)`: final hidden states (and the MTP layer's) plus the auxiliary outputs a training loss
  needs, in the model's sequence order (load-balanced under context parallelism; see model/context.py);
  no logits. `head()` is the one place logits come from, so a loss can chunk over the sequence.
- `__call__(...)`: natural-order logits, hidden states and MTP logits (inference, tests).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax import sharding
from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import SequenceInfo
from glmjax.model.context import balanced_order, to_model_order, to_natural_order
from glmjax.model.decoder import GroupAux, LayerStack, plan_segments
from glmjax.model.inputs import check_inputs
from glmjax.model.layers import Embed, Linear, RMSNorm
from glmjax.model.moe import MoEStats
from glmjax.model.mtp import MTPLayer
from glmjax.model.options import ModelOptions
from glmjax.model.rope import rope_tables
from glmjax.sharding import constrain


class LayerAux(NamedTuple):
    """Auxiliary outputs of the decoder layers (HF layer order within each field).

    moe: MoEStats stacked over the MoE layers: load [Lm, E], seq_load [Lm, B, E], seq_score [Lm, B, E].
    indexer_kl, indexer_tokens: [Lf] per full (indexer) layer, see decoder.GroupAux."""

    moe: MoEStats | None
    indexer_kl: jax.Array
    indexer_tokens: jax.Array


class BackboneOutput(NamedTuple):
    """hidden [B,T,D]: final-normed hidden states, in model order. mtp_hidden [B,T,D] or None: the MTP
    layer's first step, shared_head-normed (row j predicts token j+2; rows whose token j+1 is missing or
    in another document are invalid), model order. aux / mtp_aux: LayerAux of the main layers / the MTP
    layer. order [T] (numpy) or None: the natural token index at each model-order slot (None = identity);
    labels must be put in the same order (`to_model_order`)."""

    hidden: jax.Array
    mtp_hidden: jax.Array | None
    aux: LayerAux
    mtp_aux: LayerAux | None
    order: np.ndarray | None


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] final-normed hidden states
    mtp_logits: jax.Array | None  # [B, T-1, V] float32: row j predicts t[j+2] from t[j+1] and hidden[j]


def default_positions(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Positions counted over real tokens (left padding gets position 0), as generate() does."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B,T] -> [B,T] int32 index of the first token of each token's document (a run of equal
    ids)."""
    T = segment_ids.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)
    boundary = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)


def _join(auxes: list[GroupAux]) -> LayerAux:
    """Per-stack GroupAux (leading [groups] axis) -> LayerAux in HF layer order."""
    moes = [a.moe for a in auxes if a.moe is not None]
    moe = None
    if moes:
        flat = [jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), m) for m in moes]
        moe = jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)
    return LayerAux(moe, jnp.concatenate([a.indexer_kl.reshape(-1) for a in auxes]),
                    jnp.concatenate([a.indexer_tokens.reshape(-1) for a in auxes]))


class GlmMoeDsa(nnx.Module):
    """Embedding, scanned decoder segments, final norm, lm_head, and the MTP layer."""

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

    def sequence_info(self, positions: jax.Array, token_index: jax.Array, doc_start: jax.Array,
                      valid: jax.Array) -> SequenceInfo:
        cos, sin = rope_tables(positions, self.config.rope, self.config.qk_rope_head_dim)
        return SequenceInfo(cos, sin, token_index.astype(jnp.int32), doc_start.astype(jnp.int32),
                            valid.astype(bool))

    def head(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden [B,T,D] -> float32 logits [B,T,V]."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h, out_dtype=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))

    def context_size(self) -> int:
        """Shards of the sequence axis on the current mesh (1 without one)."""
        mesh = sharding.current_mesh()
        return sharding.mesh_size(sharding.mesh_axes("seq", mesh), mesh)

    def backbone(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                 mtp: bool = True) -> BackboneOutput:
        """input_ids [B,T] int32 in natural order; attention_mask [B,T] (1 = real token); positions [B,T]
        (default: counted over real tokens, restarting per document); segment_ids [B,T] int32 (packed
        documents: runs of equal ids; 0 = padding) -> BackboneOutput (model order). Arguments are checked by
        model/inputs.py (token id values in eager calls only)."""
        check_inputs(self.config, input_ids, attention_mask, positions, segment_ids)
        B, T = input_ids.shape
        valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        token_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            doc_start = jnp.zeros((B, T), jnp.int32)
            same_doc_next = jnp.ones((B, T), bool)
        else:
            valid = valid & (segment_ids != 0)
            doc_start = document_starts(segment_ids)
            same_doc_next = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                             jnp.zeros((B, 1), bool)], axis=1)
        if positions is None:
            positions = default_positions(input_ids, valid.astype(jnp.int32)) if segment_ids is None else \
                token_index - doc_start
        cp = self.context_size()
        order = None if cp == 1 else balanced_order(T, cp)
        to_model = lambda a: to_model_order(a, cp)  # noqa: E731
        info = self.sequence_info(*map(to_model, (positions, token_index, doc_start, valid)))

        # The token ids are split over the sequence before the lookup, so no device embeds the whole sequence.
        tokens = constrain(to_model(input_ids), ("batch", "seq"))
        x = constrain(self.embed_tokens(tokens), ("batch", "seq", "act_embed"))
        auxes = []
        for stack in self.stacks:
            x, aux = stack(x, info)
            auxes.append(aux)
        hidden = self.norm(x)

        mtp_hidden = mtp_aux = None
        if len(self.mtp) and mtp:
            # Row j takes token j+1 and hidden j: the shift is applied to the token ids in natural order
            # (cheap, and never across context shards), hidden j stays where it is.
            next_ids = jnp.concatenate([input_ids[:, 1:], input_ids[:, :1]], axis=1)
            next_valid = jnp.concatenate([valid[:, 1:], jnp.zeros((B, 1), bool)], axis=1) & same_doc_next
            mtp_info = info._replace(valid=info.valid & to_model(next_valid))
            next_tokens = constrain(to_model(next_ids), ("batch", "seq"))
            next_embeds = constrain(self.embed_tokens(next_tokens), ("batch", "seq", "act_embed"))
            _, mtp_hidden, group_aux = self.mtp[0](next_embeds, hidden, mtp_info)
            mtp_aux = _join([jax.tree.map(lambda a: a[None], group_aux)])
        return BackboneOutput(hidden, mtp_hidden, _join(auxes), mtp_aux, order)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> ModelOutput:
        """input_ids [B,T] int32; attention_mask [B,T] (1 = real token, left padding allowed); positions
        [B,T] (default: counted over real tokens); segment_ids: see `backbone`. Natural order in and out."""
        out = self.backbone(input_ids, attention_mask, positions, segment_ids)
        cp = self.context_size()
        hidden = to_natural_order(out.hidden, cp)
        mtp_logits = None
        if out.mtp_hidden is not None and input_ids.shape[1] > 1:
            mtp_logits = self.head(to_natural_order(out.mtp_hidden, cp)[:, :-1])
        return ModelOutput(self.head(hidden), hidden, mtp_logits)
