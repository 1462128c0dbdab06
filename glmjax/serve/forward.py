"""The model over a KV cache: the target forward (prefill chunks, decode steps, draft verification) and the
MTP layer's drafting steps. The same layers as training (`DecoderLayer`, `MTPLayer`); attention gets the
cache through its `update` hook (glmjax.serve.kv_cache.LayerWriter).

Shapes: B rows (cache slots served), T new tokens per row, D hidden, K index_topk, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.model.attention import SequenceInfo
from glmjax.model.decoder import unstack
from glmjax.model.mtp import MTPStep
from glmjax.model.transformer import GlmMoeDsa
from glmjax.serve.kv_cache import KVCache, LayerWriter, Rows, read_keys
from glmjax.sharding import constrain, residual


def query_info(model: GlmMoeDsa, rows: Rows, T: int, rope_offset: int | jax.Array = 0) -> SequenceInfo:
    """SequenceInfo of T new tokens per row at cache positions start + t (each slot holds one sequence from
    position 0, so the rope position is the cache position, + rope_offset for later MTP draft steps)."""
    pos = rows.positions(T)
    valid = jnp.arange(T, dtype=jnp.int32)[None, :] < rows.count[:, None]
    return model.sequence_info(pos + rope_offset, pos, jnp.zeros_like(pos), valid)


def attention_width(model: GlmMoeDsa, cache: KVCache) -> int:
    """The cache width attention is given: the lane-padded rows as stored for the TPU kernels (which take
    them), r + p for the others."""
    w = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    return cache.width if model.options.attention_impl == "pallas_tpu" else w


def target_forward(model: GlmMoeDsa, cache: KVCache, tokens: jax.Array, rows: Rows
                   ) -> tuple[KVCache, jax.Array]:
    """tokens [B,T] int32 at cache positions rows.start + t -> (cache with their rows written, final-normed
    hidden states [B,T,D]). Each token attends over its slot's keys up to itself."""
    B, T = tokens.shape
    rows = rows.on(cache)
    info = query_info(model, rows, T)
    width = attention_width(model, cache)
    x = residual(model.embed_tokens(constrain(tokens, ("batch", "seq"))))
    latents, index_keys = [], []
    for stack, lat_buf, ik_buf in zip(model.stacks, cache.latent, cache.index_keys, strict=True):
        graphdef, state = nnx.split(stack.groups)
        G = lat_buf.shape[0]

        def body(carry, xs, graphdef=graphdef):
            h, lat, ik = carry
            group_state, g = xs
            group = nnx.merge(graphdef, group_state)
            topk = None
            for j, layer in enumerate(group.layers):
                full = layer.self_attn.indexer is not None
                writer = LayerWriter(lat, ik if full else None, (g, j), (g,) if full else None, rows, width)
                h, topk, _, _ = layer(h, info, topk, update=writer)
                lat = writer.latent
                ik = writer.index_keys if full else ik
            return (h, lat, ik), None

        if G == 1:  # unscanned layers (ModelOptions.scan_layers=False)
            (x, lat_buf, ik_buf), _ = body((x, lat_buf, ik_buf), (unstack(state), jnp.int32(0)))
        else:
            (x, lat_buf, ik_buf), _ = jax.lax.scan(body, (x, lat_buf, ik_buf),
                                                   (state, jnp.arange(G, dtype=jnp.int32)))
        latents.append(lat_buf)
        index_keys.append(ik_buf)
    cache = cache._replace(latent=tuple(latents), index_keys=tuple(index_keys))
    return cache, model.norm(x)


def mtp_forward(model: GlmMoeDsa, cache: KVCache, next_tokens: jax.Array, hidden: jax.Array, rows: Rows
                ) -> tuple[KVCache, MTPStep]:
    """The MTP layer's first step over T rows: row j (cache position start + j) takes target hidden state j
    ([B,T,D], final-normed) and token j + 1 (next_tokens [B,T]); its latent row and indexer key go into the
    MTP cache. -> (cache, MTPStep: `normed` row j gives the logits of token j + 2)."""
    T = next_tokens.shape[1]
    rows = rows.on(cache)
    info = query_info(model, rows, T)
    writer = LayerWriter(cache.mtp_latent, cache.mtp_index_keys, (), (), rows, attention_width(model, cache))
    step = model.mtp[0](model.embed_tokens(next_tokens), hidden, info, update=writer)
    return cache._replace(mtp_latent=writer.latent, mtp_index_keys=writer.index_keys), step


def mtp_draft_step(model: GlmMoeDsa, cache: KVCache, token: jax.Array, h: jax.Array, topk: jax.Array,
                   length: jax.Array, step: int | jax.Array, slots: jax.Array | None = None) -> MTPStep:
    """A later draft step s >= 1 of the MTP layer for one row per slot: token [B,1] (the previous draft), h
    [B,1,D] (the previous step's output `out`), topk [B,1,K] (the first step's selection: IndexShare),
    length [B]: MTP cache rows (the first step's rows, KVShare: keys come only from target hidden states).
    The query sits at the last row (length - 1), rope position length - 1 + s, as in training. slots: the
    cache slots of the rows (None: all, in order)."""
    rows = Rows(slots, length - 1, jnp.ones_like(length)).on(cache)
    info = query_info(model, rows, 1, rope_offset=step)
    keys = read_keys(cache.mtp_latent, None, rows, attention_width(model, cache))  # keys s < length
    return model.mtp[0](model.embed_tokens(token), h, info, topk=topk, keys=keys)
