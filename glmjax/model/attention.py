"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention (DSA) and IndexShare.

Shapes: B batch, T queries, S keys (S == T in a full forward), H heads, r = kv_lora_rank, p = qk_rope_head_dim,
n = qk_nope_head_dim, v = v_head_dim. Attention runs in the absorbed form: the query's nope part is folded
through W_UK into the latent space, so every head attends over the same [S, r + p] latent rows (the KV
cache layout), and W_UV is applied after attention. This equals transformers' expanded form exactly in
exact arithmetic and is what the DSA kernels consume.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.layers import LayerNorm, Linear, RMSNorm
from glmjax.model.options import ModelOptions
from glmjax.model.rope import apply_rope
from glmjax.sharding import constrain
from pallas_kernels.dsa_indexer import indexer_topk
from pallas_kernels.sparse_mla import sparse_mla


class SequenceInfo(NamedTuple):
    """Per-forward inputs shared by every layer.

    cos, sin: [B, T, p/2] float32 rope tables. key_valid: [B, S] bool, real (non-padding) keys.
    query_index: [B, T] int32, each query's position in the key sequence (causality)."""

    cos: jax.Array
    sin: jax.Array
    key_valid: jax.Array
    query_index: jax.Array


class Indexer(nnx.Module):
    """The DSA lightning indexer of a "full" layer: picks each query's top-k keys.

    q_I = wq_b(q_resid) [B,T,HI,DI]; k_I = LayerNorm(wk(x)) [B,S,DI]; rope on their first p dims;
    w = weights_proj(x) * HI**-0.5 (float32); score = sum_h w_h relu(q_I,h . k_I) * DI**-0.5."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        HI, DI, std = cfg.index_n_heads, cfg.index_head_dim, cfg.initializer_range
        kw = dict(std=std, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.cfg, self.opts = cfg, opts
        self.wq_b = Linear((cfg.q_lora_rank,), (HI, DI), ("q_lora", "index_heads", "index_head_dim"), **kw)
        self.wk = Linear((cfg.hidden_size,), (DI,), ("embed", "index_head_dim"), **kw)
        self.k_norm = LayerNorm(DI, 1e-6, axis="index_head_dim", param_dtype=opts.param_dtype)
        # The head weights are computed in float32 (the scores they weight are float32).
        self.weights_proj = Linear((cfg.hidden_size,), (HI,), ("embed", "index_heads"), std=std,
                                   dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

    def keys(self, x: jax.Array, info: SequenceInfo) -> jax.Array:
        """Indexer keys [B,S,DI] (what an indexer KV cache stores)."""
        p = self.cfg.qk_rope_head_dim
        k = self.k_norm(self.wk(x))
        return jnp.concatenate([apply_rope(k[..., :p], info.cos, info.sin), k[..., p:]], axis=-1)

    def __call__(self, x: jax.Array, q_resid: jax.Array, info: SequenceInfo) -> jax.Array:
        """x [B,T,D] (normed layer input), q_resid [B,T,q_lora] -> top-k indices [B,T,K] int32 (-1 = empty)."""
        cfg = self.cfg
        p = cfg.qk_rope_head_dim
        q = self.wq_b(q_resid)
        q = jnp.concatenate([apply_rope(q[..., :p], info.cos, info.sin), q[..., p:]], axis=-1)
        k = self.keys(x, info)
        w = self.weights_proj(x, out_dtype=jnp.float32) * cfg.index_n_heads**-0.5
        # The selection is discrete, so the LM loss sends no gradient to the indexer or its inputs; cutting the
        # graph here also keeps autodiff away from the score kernels (the indexer trains on its own loss).
        q, k, w = jax.lax.stop_gradient((q, k, w))
        return indexer_topk(
            q, k, w, key_valid=info.key_valid, query_index=info.query_index, topk=cfg.index_topk,
            scale=cfg.index_head_dim**-0.5, q_block=self.opts.q_block, impl=self.opts.attention_impl,
        )


class MLAttention(nnx.Module):
    """MLA + DSA. A "full" layer owns an Indexer; a "shared" layer reuses the top-k it is given."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, full_indexer: bool, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        kw = dict(std=cfg.initializer_range, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.cfg, self.opts = cfg, opts
        self.scale = cfg.softmax_scale()
        self.q_a_proj = Linear((D,), (cfg.q_lora_rank,), ("embed", "q_lora"), **kw)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, axis="q_lora", param_dtype=opts.param_dtype)
        self.q_b_proj = Linear((cfg.q_lora_rank,), (H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), **kw)
        self.kv_a_proj_with_mqa = Linear((D,), (cfg.latent_dim,), ("embed", "latent"), **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, axis="kv_lora", param_dtype=opts.param_dtype)
        self.kv_b_proj = Linear((cfg.kv_lora_rank,), (H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads", "head_dim"), **kw)
        self.o_proj = Linear((H, cfg.v_head_dim), (D,), ("heads", "head_dim", "embed"), **kw)
        self.indexer = Indexer(cfg, opts, rngs=rngs) if full_indexer else None

    def latent(self, x: jax.Array, info: SequenceInfo) -> jax.Array:
        """Latent KV rows [B,S,r+p]: normed kv latent, then the roped shared key (the KV cache row)."""
        r = self.cfg.kv_lora_rank
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., :r])
        k_rope = apply_rope(ckv[..., r:], info.cos, info.sin)
        return jnp.concatenate([c, k_rope], axis=-1)

    def __call__(self, x: jax.Array, info: SequenceInfo, topk: jax.Array | None):
        """x [B,T,D] (normed), topk [B,T,K] or None on a full layer -> (out [B,T,D], topk used)."""
        cfg = self.cfg
        n, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid)  # [B,T,H,n+p]
        q = constrain(q, ("batch", "seq", "act_heads", None))
        q_rope = apply_rope(q[..., n:], info.cos, info.sin)
        w_kv = self.kv_b_proj.weight[...].astype(self.opts.dtype)  # [r, H, n+v]
        q_abs = jnp.einsum("bthn,rhn->bthr", q[..., :n], w_kv[..., :n], preferred_element_type=jnp.float32)
        q_full = jnp.concatenate([q_abs.astype(q.dtype), q_rope], axis=-1)  # [B,T,H,r+p]
        kv = self.latent(x, info)  # [B,S,r+p]

        if self.indexer is not None:
            topk = self.indexer(x, q_resid, info)
        elif topk is None:
            raise ValueError("a shared DSA layer needs the top-k indices of a full layer before it")

        o_lat, _ = sparse_mla(q_full, kv, topk, scale=self.scale, v_dim=r, q_block=self.opts.q_block,
                              impl=self.opts.attention_impl)  # [B,T,H,r]
        o = jnp.einsum("bthr,rhv->bthv", o_lat, w_kv[..., n:], preferred_element_type=jnp.float32)
        o = constrain(o.astype(self.opts.dtype), ("batch", "seq", "act_heads", None))
        return self.o_proj(o), topk
