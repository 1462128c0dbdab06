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
    """hidden [B,T,D]: final-normed hidden states, in model order. mtp_hidden: per MTP step s = 0, 1, ...
    [B,T,D] shared_head-normed (row j predicts token j+2+s; rows whose tokens j+1..j+1+s are missing or in
    another document are invalid), model order; () without MTP. aux: LayerAux of the main layers; mtp_aux:
    LayerAux over the MTP steps (the indexer KL only at step 0, where the indexer runs) or None. order [T]
    (numpy) or None: the natural token index at each model-order slot (None = identity); labels must be
    put in the same order (`to_model_order`)."""

    hidden: jax.Array
    mtp_hidden: tuple[jax.Array, ...]
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
        self.segments = plan_segments(cfg, opts.scan_layers)
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
                 mtp_steps: int = 1) -> BackboneOutput:
        """input_ids [B,T] int32 in natural order; attention_mask [B,T] (1 = real token); positions [B,T]
        (default: counted over real tokens, restarting per document); segment_ids [B,T] int32 (packed
        documents: runs of equal ids; 0 = padding); mtp_steps: steps of the MTP layer to run (0: none; see
        model/mtp.py) -> BackboneOutput (model order). Arguments are checked by model/inputs.py (token id
        values in eager calls only)."""
        check_inputs(self.config, input_ids, attention_mask, positions, segment_ids)
        if mtp_steps < 0 or (mtp_steps and not len(self.mtp)):
            raise ValueError(f"backbone: mtp_steps={mtp_steps} needs >= 0 and a model with an MTP layer")
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
        x = sharding.residual(self.embed_tokens(tokens))
        auxes = []
        for stack in self.stacks:
            x, aux = stack(x, info)
            auxes.append(aux)
        hidden = self.norm(x)

        mtp_hidden, steps = [], []
        h, same_doc = hidden, jnp.ones((B, T), bool)
        for s in range(mtp_steps):
            # Row j takes token j+1+s: the shift is applied to the token ids in natural order (cheap, and
            # never across context shards); the hidden rows stay where they are.
            def shift(a, fill, n=1 + s):
                return jnp.concatenate([a[:, n:], jnp.full((B, min(n, T)), fill, a.dtype)], axis=1)[:, :T]

            same_doc = same_doc & shift(same_doc_next, False, s) if s else same_doc_next
            step_valid = info.valid & to_model(shift(valid, False) & same_doc)
            step_info = info if s == 0 else self.sequence_info(
                *map(to_model, (positions + s, token_index, doc_start, valid)))
            step_info = step_info._replace(valid=step_valid)
            next_tokens = constrain(to_model(shift(input_ids, 0)), ("batch", "seq"))
            step = self.mtp[0](self.embed_tokens(next_tokens), h, step_info, shared=steps[0] if steps else None)
            steps.append(step)
            mtp_hidden.append(step.normed)
            h = step.out
        mtp_aux = _join([jax.tree.map(lambda a: a[None], st.aux) for st in steps]) if steps else None
        return BackboneOutput(hidden, tuple(mtp_hidden), _join(auxes), mtp_aux, order)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> ModelOutput:
        """input_ids [B,T] int32; attention_mask [B,T] (1 = real token, left padding allowed); positions
        [B,T] (default: counted over real tokens); segment_ids: see `backbone`. Natural order in and out."""
        out = self.backbone(input_ids, attention_mask, positions, segment_ids, mtp_steps=min(1, len(self.mtp)))
        cp = self.context_size()
        hidden = to_natural_order(out.hidden, cp)
        mtp_logits = None
        if out.mtp_hidden and input_ids.shape[1] > 1:
            mtp_logits = self.head(to_natural_order(out.mtp_hidden[0], cp)[:, :-1])
        return ModelOutput(self.head(hidden), hidden, mtp_logits)
