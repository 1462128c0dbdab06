"""Lightning-indexer scores on TPU (Pallas Mosaic).

score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s] * scale), -inf where s is padding, after
the query (s > query_index[b, t]) or before its document (s < query_start[b, t]). Same contract as
`reference.indexer_scores_block`.

Grid (B, T / block_q, S / block_k), key blocks innermost. Per step the query tile [block_q, H, D] is
reshaped to [block_q * H, D] so one MXU matmul against the key tile [block_k, D] gives every head's logits
[block_q * H, block_k]; relu, the head weights and the sum over heads run on the VPU. A key block that lies
entirely after the last query of the tile (causal), or entirely before the smallest document start of the
tile (packed sequences), is written as -inf without any compute: the per-tile largest query index and
smallest query start come in by scalar prefetch.

Quantized keys (the serving cache): int8 keys with a per-token float32 scale, either as an int8 array or
packed four tokens to a uint32 word along the sequence (`quantize.pack_sequence`, [B, S / 4, D]: the
serving cache's TPU layout, which a row write never relayouts); a packed tile [block_k / 4, D] is unpacked
by `pltpu.bitcast` into the int8 tile [block_k, D]. The key tile is converted to the query dtype for the
MXU and the scale multiplies each key's column before the relu (relu(c a) = c relu(a) for c > 0), so no
dequantized copy of the cache exists.

Paged keys (a paged serving cache): k is a pool of rows [1, N, D] shared by the batch and `pages` [B, M] its
page tables (key s of row b is pool row pages[b, s // page] * page + s % page). The table comes in by scalar
prefetch and the key BlockSpec's index map reads it, so each key block is DMA'd straight from its page: the
keys are scored in logical order with no gathered copy of them. A key block then lies within one page
(block_k divides the page).

VMEM per step at the tuned blocks (block_q = 16, block_k = 2048, H = 32, D = 128, bf16):
q 16*32*128*2 = 128 KiB, k 2048*128*2 = 512 KiB, logits 512*2048*4 = 4 MiB, out 16*2048*4 = 128 KiB;
double-buffered inputs and outputs about 1.5 MiB, well inside v5p / v6e VMEM.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocks import IndexerScoresTpuBlocks, KthLargestKeyTpuBlocks
from pallas_kernels.common import cdiv, out_struct, pad_axis
from pallas_kernels.dsa_indexer.topk import SIGN, ordered_keys
from pallas_kernels.quantize import quantize

NO_START = 2**31 - 1  # query_start of a padded query: above every key, so it never lowers a tile's minimum


def _kernel(*refs, scale, block_k, quantized, prefetched):
    qmax_ref, qmin_ref = refs[:2]  # (and the page tables, read by the index maps only)
    q_ref, k_ref, w_ref, valid_ref, qi_ref, qs_ref, *rest = refs[prefetched:]
    if quantized:
        ks_ref, o_ref = rest
    else:
        (o_ref,) = rest
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_start = j * block_k
    # A key block after every query of the tile (causal) or before every query's document start is all -inf.
    needed = (k_start <= qmax_ref[b, i]) & (k_start + block_k > qmin_ref[b, i])

    @pl.when(jnp.logical_not(needed))
    def _skip():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, o_ref.dtype)

    @pl.when(needed)
    def _compute():
        bq, H, D = q_ref.shape[1:]
        q = q_ref[0].reshape(bq * H, D)
        k = k_ref[0]
        if k.dtype == jnp.uint32:  # four int8 keys per word along the sequence
            k = pltpu.bitcast(k, jnp.int8)
        k = k.astype(q.dtype)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:
            logits = logits * ks_ref[0]  # [1, block_k] per-key scale
        logits = jnp.maximum(logits * scale, 0.0).reshape(bq, H, block_k)
        scores = jnp.sum(logits * w_ref[0][:, :, None], axis=1)  # [bq, block_k]
        s_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
        allowed = (valid_ref[0] > 0) & (s_idx <= qi_ref[0]) & (s_idx >= qs_ref[0])
        o_ref[0] = jnp.where(allowed, scores, -jnp.inf)


def indexer_scores_tpu(q, k, w, key_valid, query_index, *, scale: float, blocks: IndexerScoresTpuBlocks,
                       query_start=None, k_scale=None, pages=None, interpret: bool = False):
    """q [B,T,H,D], k [B,S,D] (or int8 with k_scale [B,S] f32; or int8 packed as uint32 [B,S/4,D] with
    k_scale), w [B,T,H] f32, key_valid [B,S] bool, query_index [B,T] int32, query_start [B,T] int32 or None
    -> scores [B,T,S] float32 (-inf where masked).

    pages [B, M] int32: k (and k_scale) are a pool [1, N, ...] of pages of S / M rows, read through the tables
    (the module docstring); key_valid [B, S] is in logical order and must be False where a page is -1."""
    if not isinstance(blocks, IndexerScoresTpuBlocks):
        raise TypeError(f"indexer_scores_tpu: blocks must be IndexerScoresTpuBlocks, got {type(blocks).__name__}")
    B, T, H, D = q.shape
    quantized = k_scale is not None
    pack = 4 if k.dtype == jnp.uint32 else 1
    S = k.shape[1] * pack if pages is None else key_valid.shape[1]
    if quantized and k.dtype not in (jnp.int8, jnp.uint32):
        raise ValueError(f"indexer_scores_tpu: quantized keys must be int8 (or packed in uint32), got {k.dtype}")
    if pack > 1 and (not quantized or k_scale.shape[1] != k.shape[1] * pack):
        raise ValueError(f"indexer_scores_tpu: packed keys [B, S/4, D] = {k.shape} need k_scale [B, S]")
    if not quantized and k.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"indexer_scores_tpu: keys must be bf16/f32 (or int8 with k_scale), got {k.dtype}")
    if query_start is None:
        query_start = jnp.zeros((B, T), jnp.int32)
    bq = min(blocks.block_q, max(8, cdiv(T, 8) * 8))
    bk = min(blocks.block_k, max(128, cdiv(S, 128) * 128))
    if pages is not None:
        page = S // pages.shape[1]
        if k.shape[0] != 1 or S % pages.shape[1] or page % 128 or (k.shape[1] * pack) % page:
            raise ValueError(f"indexer_scores_tpu: paged keys need a pool [1, N, D] of whole pages of a multiple of "
                             f"128 rows; got k {k.shape}, {pages.shape[1]} pages for {S} keys")
        bk = math.gcd(bk, page)  # a key block lies within one page
    q_p = pad_axis(q, 1, bq)
    w_p = pad_axis(w.astype(jnp.float32), 1, bq)
    qi_p = pad_axis(query_index.astype(jnp.int32), 1, bq, value=-1)  # padded queries see nothing
    qs_p = pad_axis(query_start.astype(jnp.int32), 1, bq, value=NO_START)  # ... nor lower a tile's min start
    k_p = k if pages is not None else pad_axis(k, 1, bk // pack)  # whole pages need no padding
    valid_p = pad_axis(key_valid.astype(jnp.int32), 1, bk)[:, None, :]  # [B, 1, S]
    Tp, Sp = q_p.shape[1], valid_p.shape[2]
    nq, nk = Tp // bq, Sp // bk
    qmax = jnp.max(qi_p.reshape(B, nq, bq), axis=-1)  # [B, nq] scalar-prefetched
    qmin = jnp.min(qs_p.reshape(B, nq, bq), axis=-1)
    if pages is None:
        prefetch = (qmax, qmin)
        key_block = lambda b, i, j, *_: (b, j)  # noqa: E731
    else:  # key block j of row b: block j % per_page of page pages[b, j // per_page] (-1: page 0, masked)
        per_page = page // bk
        prefetch = (qmax, qmin, jnp.maximum(pages.astype(jnp.int32), 0))
        key_block = lambda b, i, j, qmax, qmin, table: (0, table[b, j // per_page] * per_page + j % per_page)  # noqa: E731
    in_specs = [
        pl.BlockSpec((1, bq, H, D), lambda b, i, j, *_: (b, i, 0, 0)),
        pl.BlockSpec((1, bk // pack, D), lambda *a: (*key_block(*a), 0)),
        pl.BlockSpec((1, bq, H), lambda b, i, j, *_: (b, i, 0)),
        pl.BlockSpec((1, 1, bk), lambda b, i, j, *_: (b, 0, j)),
        pl.BlockSpec((1, bq, 1), lambda b, i, j, *_: (b, i, 0)),
        pl.BlockSpec((1, bq, 1), lambda b, i, j, *_: (b, i, 0)),
    ]
    args = [q_p, k_p, w_p, valid_p, qi_p[:, :, None], qs_p[:, :, None]]
    if quantized:
        in_specs.append(pl.BlockSpec((1, 1, bk), lambda *a: (key_block(*a)[0], 0, key_block(*a)[1])))
        ks = k_scale.astype(jnp.float32)
        args.append((ks if pages is not None else pad_axis(ks, 1, bk))[:, None, :])
    flops = 2 * B * Tp * H * D * Sp // 2 + 3 * B * Tp * H * Sp // 2  # about half the tiles are causal-skipped
    cost = pl.CostEstimate(
        flops=int(flops), transcendentals=0,
        bytes_accessed=int(q_p.size * q_p.dtype.itemsize + nq * B * Sp * D * k_p.dtype.itemsize // pack // 2
                           + B * Tp * Sp * 4),
    )
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk, quantized=quantized, prefetched=len(prefetch)),
        out_shape=out_struct((B, Tp, Sp), jnp.float32, *prefetch, *args),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(B, nq, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((1, bq, bk), lambda b, i, j, *_: (b, i, j)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        cost_estimate=cost,
        interpret=interpret,
    )(*prefetch, *args)
    return out[:, :T, :S]


def quantize_keys_int8(k):
    """k [..., D] -> (int8 keys, float32 per-token scale [...]): symmetric, amax / 127 (quantize.quantize)."""
    return quantize(k, jnp.int8)


def _threshold_kernel(s_ref, o_ref, *, k):
    def step(i, ans_u):
        cand_u = ans_u | jnp.left_shift(jnp.int32(1), 31 - i)
        # Keys are recomputed from the VMEM-resident scores each pass (a few VPU ops) rather than stored:
        # a second [rows, S] array would not fit next to the scores at 1M context on v5p.
        hits = (ordered_keys(s_ref[...]) >= (cand_u ^ SIGN)).astype(jnp.float32)  # counts <= 2**24: exact
        count = jnp.sum(hits, axis=-1, keepdims=True)
        return jnp.where(count >= k, cand_u, ans_u)

    ans_u = jax.lax.fori_loop(0, 32, step, jnp.zeros(o_ref.shape, jnp.int32))
    o_ref[...] = ans_u ^ SIGN


def kth_largest_key_tpu(scores, k: int, *, blocks: KthLargestKeyTpuBlocks, interpret: bool = False):
    """scores [R, S] float32 -> [R, 1] int32: the k-th largest ordered key per row (see topk.kth_largest_key).

    Each grid step holds blocks.block_rows full rows in VMEM and runs the 32 compare-and-count passes there, so
    HBM is read once instead of 32 times (block_rows * S * 4 bytes of VMEM: 4 MiB at 8 rows, S = 128K)."""
    if not isinstance(blocks, KthLargestKeyTpuBlocks):
        raise TypeError(f"kth_largest_key_tpu: blocks must be KthLargestKeyTpuBlocks, got {type(blocks).__name__}")
    block_rows = blocks.block_rows
    R, S = scores.shape
    if S > 2**24:
        raise ValueError(f"kth_largest_key_tpu: rows of {S} keys exceed exact float32 counting (2**24)")
    x = pad_axis(scores.astype(jnp.float32), 0, block_rows, value=-jnp.inf)
    Rp = x.shape[0]
    vmem = 2 * block_rows * S * 4 + (8 << 20)  # the single-buffered scores, compare temporaries, slack
    out = pl.pallas_call(
        functools.partial(_threshold_kernel, k=k),
        out_shape=out_struct((Rp, 1), jnp.int32, x),
        grid=(Rp // block_rows,),
        # One buffer: the next row block's copy would double VMEM, and the 32 passes dwarf the copy.
        in_specs=[pl.BlockSpec((block_rows, S), lambda i: (i, 0), pipeline_mode=pl.Buffered(1))],
        out_specs=pl.BlockSpec((block_rows, 1), lambda i: (i, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=int(vmem)),
        cost_estimate=pl.CostEstimate(flops=int(64 * Rp * S), transcendentals=0, bytes_accessed=int(Rp * S * 4)),
        interpret=interpret,
    )(x)
    return out[:R]
