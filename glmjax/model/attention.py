"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention (DSA) and IndexShare.

Shapes: B batch, T queries, S keys, H heads, r = kv_lora_rank, p = qk_rope_head_dim, n = qk_nope_head_dim,
v = v_head_dim, HI/DI indexer heads/dim, K = index_topk. Attention runs in the absorbed form: the query's
nope part is folded through W_UK into the latent space, so every head attends over the same [S, r + p]
latent rows (the KV cache layout), and W_UV is applied after attention.

Attention is two steps, so a KV-cache engine calls the same code as the full forward:
- `project(x)`: everything that depends only on the new tokens: absorbed queries, the new latent rows, the
  indexer's queries, head weights and new keys;
- `attend(projection, keys)`: top-k selection (full layers) and sparse attention against `keys`, latent
  rows and indexer keys of any length S with their validity. The full forward is keys = this sequence.

On a mesh `attend` runs inside `shard_map` (Pallas kernels are not auto-partitioned): batch over the
batch axes, query and indexer heads over tensor (the indexer's head-weighted score is then a partial sum,
reduced before top-k), queries over context. Under context parallelism each shard all-gathers this
sequence's latent rows and indexer keys (small: 576 + 128 values per token) and attends locally. A serving
KV cache is instead split over the keys ("kv_seq"): each shard selects and attends among its own keys, and
the shards' outputs merge by log-sum-exp (`_attend_sharded`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax import sharding
from glmjax.config import GlmMoeDsaConfig
from glmjax.model.context import gather_natural
from glmjax.model.layers import LayerNorm, Linear, RMSNorm
from glmjax.model.options import ModelOptions
from glmjax.model.rope import apply_rope
from glmjax.sharding import constrain
from pallas_kernels.dense_warmup import dense_indexer_kl, dense_mla
from pallas_kernels.dsa_indexer import indexer_scores_at, indexer_topk
from pallas_kernels.quantize import QuantizedRows
from pallas_kernels.sparse_mla import attention_probs_at, merge_shards, sparse_mla


class SequenceInfo(NamedTuple):
    """Per-query inputs shared by every layer (the queries of this call, in model order).

    cos, sin: [B, T, p/2] float32 rope tables at the queries' positions.
    token_index: [B, T] int32, each query's index in the key sequence: it sees keys s <= token_index.
    doc_start: [B, T] int32, the first key of the query's document: keys s < doc_start are masked (packed
      sequences; zeros otherwise).
    valid: [B, T] bool, the query is a real token (as a key of its own sequence: not padding)."""

    cos: jax.Array
    sin: jax.Array
    token_index: jax.Array
    doc_start: jax.Array
    valid: jax.Array


class Keys(NamedTuple):
    """Keys to attend over (a KV cache): latent [B,S,r+p], index_keys [B,S,DI] (None where the layer has no
    indexer), valid [B,S] bool. Key s is the token with token_index s. latent and index_keys may be
    QuantizedRows (an FP8 serving cache: pallas_kernels.quantize), which the kernels read as they are.

    pages [B, S / page] int32 (a paged cache): latent and index_keys are then pools [1, N, ...] of rows shared
    by every row b, and key s of row b is pool row pages[b, s // page] * page + s % page."""

    latent: jax.Array | QuantizedRows
    index_keys: jax.Array | QuantizedRows | None
    valid: jax.Array
    pages: jax.Array | None = None


class Projection(NamedTuple):
    """The new tokens' side of attention. q [B,T,H,r+p] absorbed queries; latent [B,T,r+p] new latent rows;
    index_q [B,T,HI,DI], index_w [B,T,HI] float32 and index_keys [B,T,DI] on full layers (else None)."""

    q: jax.Array
    latent: jax.Array
    index_q: jax.Array | None
    index_w: jax.Array | None
    index_keys: jax.Array | None


class DenseTarget(NamedTuple):
    """What the dense warm-up's indexer KL needs of one attention layer (ModelOptions.dense_attention with
    indexer_loss), laid out like the layer's tokens: q [B,T,H,r+p] its absorbed queries, kv [B,T,r+p] the
    latent rows it attended, lse [B,T,H] its log-sum-exp (no gradient); on a full layer also its indexer's
    queries iq [B,T,HI,DI], keys ik [B,T,DI] and head weights iw [B,T,HI] (else None)."""

    q: jax.Array
    kv: jax.Array
    lse: jax.Array
    iq: jax.Array | None = None
    ik: jax.Array | None = None
    iw: jax.Array | None = None


class AttentionAux(NamedTuple):
    """What the DSA indexer loss needs (only when ModelOptions.indexer_loss): probs [B,T,K] the attention
    probabilities summed over heads at the selected keys (no gradient), index_logits [B,T,K] the indexer's
    scores there (full layers, with gradient to the indexer's parameters; -inf in empty slots). Under
    dense_attention both are None and `dense` carries what the KL over every key is computed from.
    latent [B,T,r+p]: the latent rows of this call's own tokens (its KV; what a later MTP step shares).
    keys: the Keys attended over when a cache `update` was given (the updated cache). lse: dense attention's
    log-sum-exp [B,T,H] on its way out of the mesh-level call (folded into `dense`)."""

    probs: jax.Array | None
    index_logits: jax.Array | None
    latent: jax.Array | None = None
    keys: Keys | None = None
    dense: DenseTarget | None = None
    lse: jax.Array | None = None


# A KV-cache hook (the serving engine's): writes a Projection's new rows into a cache and returns the Keys to
# attend over, these rows included.
CacheUpdate = Callable[[Projection], Keys]


class Indexer(nnx.Module):
    """The DSA lightning indexer of a "full" layer.

    q_I = wq_b(q_resid) [B,T,HI,DI]; k_I = LayerNorm(wk(x)) [B,T,DI]; rope on their first p dims;
    w = weights_proj(x) * HI**-0.5 (float32); score = sum_h w_h relu(q_I,h . k_I) * DI**-0.5.

    Its inputs are detached: the indexer learns only from its own (KL) loss, and that loss trains nothing
    else. The top-k it feeds to attention is discrete, so the LM loss sends it no gradient either."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        HI, DI, std = cfg.index_n_heads, cfg.index_head_dim, cfg.initializer_range
        kw = dict(std=std, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.cfg, self.opts = cfg, opts
        self.wq_b = Linear((cfg.q_lora_rank,), (HI, DI), ("q_lora", "index_heads", "index_head_dim"), **kw)
        self.wk = Linear((cfg.hidden_size,), (DI,), ("embed", "index_head_dim"), **kw)
        self.k_norm = LayerNorm(DI, 1e-6, axis="index_head_dim", param_dtype=opts.param_dtype)
        # Stored in param_dtype; the head weights it produces are float32 (they weight float32 scores).
        self.weights_proj = Linear((cfg.hidden_size,), (HI,), ("embed", "index_heads"), std=std,
                                   dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

    def keys(self, x: jax.Array, info: SequenceInfo) -> jax.Array:
        """Indexer keys [B,T,DI] of the tokens x [B,T,D] (what the indexer cache stores)."""
        p = self.cfg.qk_rope_head_dim
        k = self.k_norm(self.wk(jax.lax.stop_gradient(x)))
        return jnp.concatenate([apply_rope(k[..., :p], info.cos, info.sin), k[..., p:]], axis=-1)

    def project(self, x: jax.Array, q_resid: jax.Array, info: SequenceInfo):
        """x [B,T,D] (normed layer input), q_resid [B,T,q_lora] -> (q [B,T,HI,DI], w [B,T,HI] f32, k [B,T,DI])."""
        cfg = self.cfg
        p = cfg.qk_rope_head_dim
        q = self.wq_b(jax.lax.stop_gradient(q_resid))
        q = jnp.concatenate([apply_rope(q[..., :p], info.cos, info.sin), q[..., p:]], axis=-1)
        q = constrain(q, ("batch", "seq", "act_index_heads", None))
        w = self.weights_proj(jax.lax.stop_gradient(x), out_dtype=jnp.float32) * cfg.index_n_heads**-0.5
        return q, constrain(w, ("batch", "seq", "act_index_heads")), self.keys(x, info)


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
        """Latent KV rows [B,T,r+p]: normed kv latent, then the roped shared key (the KV cache row)."""
        r = self.cfg.kv_lora_rank
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., :r])
        k_rope = apply_rope(ckv[..., r:], info.cos, info.sin)
        return jnp.concatenate([c, k_rope], axis=-1)

    def project(self, x: jax.Array, info: SequenceInfo) -> Projection:
        """x [B,T,D] (normed layer input) -> Projection of these tokens."""
        cfg = self.cfg
        n = cfg.qk_nope_head_dim
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid)  # [B,T,H,n+p]
        q = constrain(q, ("batch", "seq", "act_heads", None))
        q_rope = apply_rope(q[..., n:], info.cos, info.sin)
        w_kv = self.kv_b_proj.weight[...].astype(self.opts.dtype)  # [r, H, n+v]
        q_abs = jnp.einsum("bthn,rhn->bthr", q[..., :n], w_kv[..., :n], preferred_element_type=jnp.float32)
        q_full = constrain(jnp.concatenate([q_abs.astype(q.dtype), q_rope], axis=-1),
                           ("batch", "seq", "act_heads", None))  # [B,T,H,r+p]
        latent = constrain(self.latent(x, info), ("batch", "seq", None))
        if self.indexer is None:
            return Projection(q_full, latent, None, None, None)
        iq, iw, ik = self.indexer.project(x, q_resid, info)
        return Projection(q_full, latent, iq, iw, constrain(ik, ("batch", "seq", None)))

    def attend(self, proj: Projection, info: SequenceInfo, topk: jax.Array | None = None,
               keys: Keys | None = None, shared_latent: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, AttentionAux]:
        """Attention of the projected queries over `keys` (default: the queries' own tokens, the full
        forward) -> (out [B,T,D], top-k indices [B,T,K] used, AttentionAux).

        topk: indices to reuse (IndexShare): required on a shared layer; on a full layer None runs its
        indexer, and given indices skip it (later MTP draft steps reuse the first step's selection).
        shared_latent [B,T,r+p] (KVShare, with topk): attend over these rows of the same tokens, laid out
        like the queries (a first MTP step's KV), instead of this call's own."""
        cfg, opts = self.cfg, self.opts
        select = topk is None
        if select and self.indexer is None:
            raise ValueError("a shared DSA layer needs the top-k indices of a full layer before it")
        own_latent = proj.latent
        if shared_latent is not None:
            if select or keys is not None:
                raise ValueError("shared_latent (KVShare) needs the top-k it was selected with, and no keys")
            proj = proj._replace(latent=shared_latent)
        own = keys is None
        if own:
            keys = Keys(proj.latent, proj.index_keys, info.valid)
        if select and keys.index_keys is None:
            raise ValueError("a full DSA layer needs indexer keys for its keys (Keys.index_keys)")
        if not select:
            proj = proj._replace(index_q=None, index_w=None)
            keys = keys._replace(index_keys=None)
        o_lat, topk, aux = self._attend_sharded(proj, keys, info, topk, own)
        if aux.lse is not None:  # dense warm-up with the indexer loss: the KL is taken per IndexShare group
            aux = aux._replace(lse=None, dense=DenseTarget(proj.q, keys.latent, aux.lse, proj.index_q,
                                                           keys.index_keys, proj.index_w))
        w_uv = self.kv_b_proj.weight[...].astype(opts.dtype)[..., cfg.qk_nope_head_dim:]
        o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv, preferred_element_type=jnp.float32)
        o = constrain(o.astype(opts.dtype), ("batch", "seq", "act_heads", None))
        return self.o_proj(o), topk, aux._replace(latent=own_latent)

    def __call__(self, x: jax.Array, info: SequenceInfo, topk: jax.Array | None = None,
                 keys: Keys | None = None, shared_latent: jax.Array | None = None,
                 update: CacheUpdate | None = None) -> tuple[jax.Array, jax.Array, AttentionAux]:
        """x [B,T,D] (normed) -> attend(project(x)); see `attend`. update: a KV cache's hook; the new rows go
        into the cache first and attention runs over the Keys it returns (AttentionAux.keys)."""
        proj = self.project(x, info)
        if update is None:
            return self.attend(proj, info, topk, keys, shared_latent)
        if keys is not None or shared_latent is not None:
            raise ValueError("a cache update brings its own keys: pass neither keys nor shared_latent")
        keys = update(proj)
        out, topk, aux = self.attend(proj, info, topk, keys)
        return out, topk, aux._replace(keys=keys)

    def _attend_sharded(self, proj: Projection, keys: Keys, info: SequenceInfo, topk, own: bool):
        """Top-k + sparse attention, inside shard_map on a mesh -> (o_lat [B,T,H,r], topk, aux).

        Given keys (a KV cache) may be split over the mesh axes of "kv_seq" (a sequence-sharded cache): each
        shard then scores and selects among its own keys (the exact global top-k, `sharded_topk`), attends
        over them, and the partial outputs merge by log-sum-exp. The top-k indices it returns (and takes, on
        a shared layer) are then each shard's local selection, concatenated over the shards: [B,T,n*K]."""
        mesh = sharding.current_mesh()
        head_axes = sharding.mesh_axes("act_heads", mesh)
        index_head_axes = sharding.mesh_axes("act_index_heads", mesh)
        seq_axes = sharding.mesh_axes("seq", mesh)
        kv_axes = () if own else sharding.mesh_axes("kv_seq", mesh)
        cp = sharding.mesh_size(seq_axes, mesh)
        if not own and cp > 1:
            raise NotImplementedError("attention over a given KV cache with the queries split over a context "
                                      "axis: split the cache instead (the serving rules' \"kv_seq\")")
        if set(kv_axes) & (set(head_axes) | set(index_head_axes)):
            raise ValueError(f"a KV cache split over {kv_axes} needs the attention heads whole there "
                             f"(heads over {head_axes}, indexer heads over {index_head_axes})")
        if kv_axes and self.opts.indexer_loss:
            raise NotImplementedError("the indexer loss over a sequence-sharded KV cache")
        if self.opts.dense_attention and not own:
            raise NotImplementedError("dense attention (the DSA warm-up) over a KV cache")

        def core(a):
            kv, ik, kvalid, tok, start = a["kv"], a["ik"], a["kvalid"], a["tok"], a["start"]
            if own:  # this sequence's rows from every context shard, natural order
                kv, kvalid = gather_natural(kv, seq_axes, cp), gather_natural(kvalid, seq_axes, cp)
                ik = None if ik is None else gather_natural(ik, seq_axes, cp)
            if kv_axes:  # positions relative to this shard's first key
                offset = jax.lax.axis_index(kv_axes) * kvalid.shape[1]
                tok, start = tok - offset, start - offset
            return self._attend_local(a["q"], kv, ik, kvalid, a["iq"], a["iw"], tok, start, a.get("topk"),
                                      head_axes, index_head_axes, kv_axes, a.get("pages"), pool_axes, pool_split)

        args = dict(q=proj.q, kv=keys.latent, ik=keys.index_keys, kvalid=keys.valid, iq=proj.index_q,
                    iw=proj.index_w, tok=info.token_index, start=info.doc_start)
        if topk is not None:
            args["topk"] = topk
        pool_axes = pool_split = ()
        if keys.pages is not None:
            args["pages"] = keys.pages
            # The pools are split over "kv_pages": each slot group's pages on its devices, and on a cache split
            # over the sequence each shard's pages of its range of positions (its columns of the page table).
            # A call whose rows are not split like the slots (a prefill chunk's one request) merges over the
            # slot groups too.
            pool_axes = sharding.mesh_axes("kv_pages", mesh)
            pool_split = tuple(a for a in pool_axes if a not in sharding.mesh_axes("batch", mesh) + kv_axes)
        if mesh is None:
            return core(args)
        key_seq = "seq" if own else "kv_seq"
        topk_axes = ("batch", "seq", None if own else "kv_seq")
        axes = dict(q=("batch", "seq", "act_heads", None), kv=("batch", key_seq, None),
                    ik=("batch", key_seq, None), kvalid=("batch", key_seq),
                    iq=("batch", "seq", "act_index_heads", None), iw=("batch", "seq", "act_index_heads"),
                    tok=("batch", "seq"), start=("batch", "seq"), topk=topk_axes, pages=("batch", key_seq))
        if keys.pages is not None:  # pools [1, pages * page, ...]: the pages split over "kv_pages"
            axes.update(kv=(None, "kv_pages", None), ik=(None, "kv_pages", None))
        # A quantized cache's parts (values, per-row scale, rope tail) share their leading axes.
        in_specs = {k: jax.tree.map(lambda a, k=k: sharding.logical_to_spec(axes[k][:a.ndim], a.shape, mesh=mesh,
                                                                            what=f"attention input {k}"), v)
                    for k, v in args.items()}
        row = sharding.logical_to_spec(("batch", "seq", None), mesh=mesh)
        out_specs = (sharding.logical_to_spec(("batch", "seq", "act_heads", None), mesh=mesh),
                     sharding.logical_to_spec(topk_axes, mesh=mesh),
                     AttentionAux(row, row, lse=sharding.logical_to_spec(("batch", "seq", "act_heads"), mesh=mesh)))
        # check_vma=False: Pallas interpret mode cannot evaluate kernels on values typed as varying over manual
        # axes. Without the typing, the cotangent of an input replicated over an axis (kv over tensor) is
        # still summed over that axis by shard_map's transpose: the mesh tests check every gradient.
        return jax.shard_map(core, in_specs=(in_specs,), out_specs=out_specs, check_vma=False)(args)

    def _attend_local(self, q, kv, ik, kvalid, iq, iw, tok, start, topk, head_axes, index_head_axes,
                      kv_axes=(), pages=None, pool_axes=(), pool_split=()):
        """One shard's attention: its queries against its keys (all of them, or its share of a cache split
        over kv_axes). Head-split partial sums are reduced over the given mesh axes (inside shard_map; empty
        tuples outside). The top-k indices are logical key positions.

        pages: a paged cache's page table (Keys); kv and ik are this shard's pages of pools split over
        pool_axes, and the keys on other shards' pages are not valid here. pool_split: the pool axes the
        call's rows are replicated over (a prefill chunk): only the shard holding a row's pages selects and
        attends for it, and the results merge over them."""
        cfg, opts = self.cfg, self.opts
        if opts.dense_attention:
            # Every allowed key, blockwise (no [T, S] array); no top-k is selected, and a shared layer ignores
            # the empty one it is handed. The indexer KL is the group's (decoder.LayerGroup), from the lse.
            o_lat, lse = dense_mla(q, kv, key_valid=kvalid, query_index=tok, query_start=start, scale=self.scale,
                                   v_dim=cfg.kv_lora_rank, q_block=opts.q_block)
            topk = jnp.zeros((*tok.shape, 0), jnp.int32)
            return o_lat, topk, AttentionAux(None, None, lse=lse if opts.indexer_loss else None)
        common = dict(q_block=opts.q_block, impl=opts.attention_impl, interpret=opts.interpret)
        page = None
        if pages is not None:
            page = kvalid.shape[1] // pages.shape[1]
            pages, kvalid = _local_pages(pages, kvalid, page, kv.shape[1] // page, pool_axes)
        merge_axes = kv_axes + pool_split
        # The indexer scores every key in logical order: the TPU kernel reads them through the page tables,
        # the other impls get them gathered.
        kernel_pages = pages if opts.attention_impl == "pallas_tpu" else None
        if iq is not None and pages is not None and kernel_pages is None:
            ik = _paged_keys(ik, pages, page)
        if iq is not None:
            psum_scores = (lambda s: jax.lax.psum(s, index_head_axes)) if index_head_axes else None
            ik, ik_scale = (ik.values, ik.scale) if isinstance(ik, QuantizedRows) else (ik, None)
            topk = indexer_topk(
                jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik), jax.lax.stop_gradient(iw), k_scale=ik_scale,
                key_valid=kvalid, query_index=tok, query_start=start,
                topk=cfg.index_topk,
                scale=cfg.index_head_dim**-0.5, reduce_scores=psum_scores, key_shards=merge_axes,
                pages=kernel_pages, **common)
            if pool_split:  # one shard selected (logical positions), the others hold only empty slots
                topk = jax.lax.psum(topk + 1, pool_split) - 1
        rows = topk if pages is None else _pool_rows(topk, pages, page)
        o_lat, lse = sparse_mla(q, kv, rows, scale=self.scale, v_dim=cfg.kv_lora_rank, **common)
        if merge_axes:
            o_lat, lse = merge_shards(o_lat, lse, merge_axes)
        probs = logits = None
        if opts.indexer_loss:
            probs = attention_probs_at(q, kv, topk, lse, scale=self.scale, q_block=opts.q_block)
            if head_axes:
                probs = jax.lax.psum(probs, head_axes)
            if iq is not None:
                logits = indexer_scores_at(iq, ik, iw, topk, scale=cfg.index_head_dim**-0.5, q_block=opts.q_block)
                if index_head_axes:
                    logits = jax.lax.psum(logits, index_head_axes)
                logits = jnp.where(topk >= 0, logits, -jnp.inf)
        return o_lat, topk, AttentionAux(probs, logits)


def dense_indexer_loss(targets: list[DenseTarget], info: SequenceInfo, *, scale: float, index_scale: float,
                       q_block: int) -> tuple[jax.Array, jax.Array]:
    """The dense warm-up's indexer loss of one IndexShare group: targets[0] is the full layer's (with its
    indexer), the rest the layers sharing its selection. -> (sum over valid queries of KL(p || softmax(
    indexer scores)) over every allowed key, p the group's head-summed, layer-averaged, L1-normalised
    attention; the number of such queries), as decoder.indexer_kl gives for the sparse stage.

    On a mesh the queries are split over the residual stream's axes ("res_seq": context x tensor) with every
    head whole, so each device computes whole distributions for its share of the queries and no [q, k]
    block is ever reduced across devices; the keys are gathered in natural order."""
    full = targets[0]
    mesh = sharding.current_mesh()
    seq_axes = sharding.mesh_axes("seq", mesh)
    cp = sharding.mesh_size(seq_axes, mesh)

    def local(a):
        nat = (lambda x: gather_natural(x, seq_axes, cp)) if cp > 1 else (lambda x: x)
        kvalid = nat(a["kvalid"])
        layers = tuple((q, nat(kv), lse) for q, kv, lse in a["targets"])
        kl, has = dense_indexer_kl(layers, a["iq"], nat(a["ik"]), a["iw"], key_valid=kvalid,
                                   query_index=a["tok"], query_start=a["start"], scale=scale,
                                   index_scale=index_scale, q_block=q_block)
        return jnp.where(has & a["valid"], kl, 0.0), (has & a["valid"]).astype(jnp.float32)

    args = dict(targets=[(t.q, t.kv, t.lse) for t in targets], iq=full.iq, ik=full.ik, iw=full.iw,
                kvalid=info.valid, valid=info.valid, tok=info.token_index, start=info.doc_start)
    if mesh is None:
        kl, n = local(args)
    else:
        def spec(*axes):
            return sharding.logical_to_spec(axes, mesh=mesh)

        rows = spec("batch", "res_seq")
        keys = spec("batch", "seq", None)
        in_specs = dict(targets=[(spec("batch", "res_seq", None, None), keys, spec("batch", "res_seq", None))
                                 for _ in targets],
                        iq=spec("batch", "res_seq", None, None), ik=keys, iw=spec("batch", "res_seq", None),
                        kvalid=spec("batch", "seq"), valid=rows, tok=rows, start=rows)
        kl, n = jax.shard_map(local, in_specs=(in_specs,), out_specs=(rows, rows), check_vma=False)(args)
    return jnp.sum(kl), jnp.sum(n)


def _local_pages(pages: jax.Array, kvalid: jax.Array, page: int, held: int, pool_axes: tuple[str, ...]):
    """Page tables [B, M] of global page ids -> (ids among the `held` pages of this shard's part of a pool split
    over pool_axes, -1 for pages held elsewhere; kvalid [B, M * page] with their positions not valid here)."""
    first = jax.lax.axis_index(pool_axes) * held if pool_axes else 0
    local = pages - first
    mine = (pages >= 0) & (local >= 0) & (local < held)
    return jnp.where(mine, local, -1), kvalid & jnp.repeat(mine, page, axis=1)


def _pool_rows(indices: jax.Array, pages: jax.Array, page: int) -> jax.Array:
    """Logical key positions [B,T,K] (-1 = empty) -> rows of a paged pool: pages[b, s // page] * page + s % page
    (-1 where the position has no page here)."""
    safe = jnp.maximum(indices, 0)
    page_ids = jax.vmap(lambda table, i: table[i])(pages, safe // page)
    return jnp.where((indices >= 0) & (page_ids >= 0), page_ids * page + safe % page, -1)


def _paged_keys(pool, pages: jax.Array, page: int):
    """_paged_view of an indexer-key pool: an array or QuantizedRows (a sequence-packed one's words hold
    page / 4 rows of words per page)."""
    if isinstance(pool, QuantizedRows) and pool.sequence_packed:
        return QuantizedRows(_paged_view(pool.values, pages, page // 4), _paged_view(pool.scale, pages, page))
    return jax.tree.map(lambda a: _paged_view(a, pages, page), pool)


def _paged_view(pool: jax.Array, pages: jax.Array, page: int) -> jax.Array:
    """A pool of rows [1, N, D] and page tables [B, M] -> every row's keys in logical order [B, M * page, D]
    (unallocated pages, -1, read page 0: their positions are never valid keys)."""
    B, M = pages.shape
    rows = jnp.maximum(pages, 0)[:, :, None] * page + jnp.arange(page, dtype=pages.dtype)
    return pool[0][rows.reshape(B, M * page)]
