"""DSA lightning-indexer scores on GPU: a Pallas Triton kernel (H100/H200), plus the FP8 key-cache helper.

score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s] * scale), -inf where s > query_index[b, t],
s < query_start[b, t] (packed documents) or key s is not valid. Same contract as `indexer_scores_block` in
`reference.py`.

Grid `(n_q_blocks, n_k_blocks, B)`; the first grid axis is CUDA's x, the fastest-moving one, so the programs
that run together share one key tile (read from HBM once, then hit in L2) and differ in their (small) query
tile. One program computes one [block_q, block_k] tile of scores:

- q tile [block_q * H, D]: the block_q queries' H heads flattened into the rows of one matmul
  (GLM-5.2, block_rows = 128: block_q = 128 // 32 = 4 queries -> 128 rows x 128 dims, bf16: 32 KiB; for
  decode, T = 1, block_q = 1 and the tile is 32 rows: no padded queries are computed).
- k tile [block_k, D] = [128, 128]: 32 KiB bf16 or 16 KiB fp8 (fp8 converts exactly to bf16 in registers,
  and its per-token scale multiplies the logits column-wise: q . (k * s) = (q . k) * s).
- logits [block_q * H, block_k] float32 accumulator: 128 x 128 x 4 = 64 KiB, i.e. 64 registers per thread
  with 8 warps; relu, the per-row head weight, then a reshape to [block_q, H, block_k] and a sum over H.
- Triton stages q and k through shared memory for the tensor-core dot: about 64 KiB per stage at bf16, so
  num_stages = 1 (nothing to pipeline: each program has exactly one dot) keeps us well within the 228 KiB
  of an SM, and two programs fit per SM.
- Output tile [block_q, block_k] float32 (2 KiB) stored once.

Causality: a program whose key tile starts after the largest query_index of its query tile, or ends before
the smallest query_start, writes -inf without loading anything (a decode query at position p only reads
keys [0, p]; for a prefill block the upper triangle is skipped, and with packed documents the keys of the
earlier documents too).

Arithmetic: per (query, key) pair 2 * H * D = 8192 FLOPs against 4 output bytes, and each key tile is read
once per grid column, so the kernel is bound by tensor-core throughput for prefill blocks and by key
bandwidth for decode (32 MiB of bf16 keys, 16 MiB fp8, per 128K-token sequence and full layer).

Shapes that are not powers of two (Triton requires them for every tile) are padded here: queries and keys
to the tile multiples, H and D to powers of two with zeros (a zero head weight contributes nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import IndexerScoresGpuBlocks
from pallas_kernels.common import out_struct, pad_axis
from pallas_kernels.quantize import quantize

NO_START = 2**31 - 1  # query_start of a padded query: above every key, so it never lowers a tile's minimum


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def quantize_keys_fp8(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token FP8 (e4m3) quantization of indexer keys for the serving cache.

    k [B,S,D] -> (k_fp8 [B,S,D] float8_e4m3fn, k_scale [B,S] float32) with k ~= k_fp8 * k_scale[..., None];
    k_scale = amax over D / 448 (1 for an all-zero row); quantize.quantize."""
    return quantize(k, jnp.float8_e4m3fn)


def _indexer_kernel(q_ref, k_ref, w_ref, valid_ref, qi_ref, qs_ref, *rest, scale, block_q, heads, block_k,
                    has_scale, compute_dtype):
    if has_scale:
        ks_ref, o_ref = rest
    else:
        (o_ref,) = rest
    j = pl.program_id(1)
    k_start = j * block_k
    qi = qi_ref[...]  # [block_q] int32
    qs = qs_ref[...]  # [block_q] int32
    # Skip a key tile after every query of the tile (causal) or before every query's document start.
    needed = (k_start <= jnp.max(qi)) & (k_start + block_k > jnp.min(qs))

    @pl.when(needed)
    def _compute():
        q = q_ref[...]  # [block_q*H, D]
        k = k_ref[...]  # [block_k, D]
        if k.dtype != compute_dtype:
            k = k.astype(compute_dtype)
        if q.dtype != compute_dtype:
            q = q.astype(compute_dtype)
        logits = plgpu.dot(q, k, trans_b=True)  # [block_q*H, block_k] float32
        if has_scale:
            logits = logits * ks_ref[...][None, :]
        weighted = jnp.maximum(logits * scale, 0.0) * w_ref[...][:, None]
        scores = jnp.sum(weighted.reshape(block_q, heads, block_k), axis=1)  # [block_q, block_k]
        s_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        allowed = (valid_ref[...] != 0)[None, :] & (s_idx <= qi[:, None]) & (s_idx >= qs[:, None])
        plgpu.store(o_ref, jnp.where(allowed, scores, -jnp.inf))

    @pl.when(jnp.logical_not(needed))
    def _skip():
        plgpu.store(o_ref, jnp.full((block_q, block_k), -jnp.inf, jnp.float32))


def indexer_scores_gpu(q, k, w, key_valid, query_index, *, scale: float, blocks: IndexerScoresGpuBlocks,
                       query_start=None, k_scale=None, interpret: bool = False) -> jax.Array:
    """Indexer scores [B,bq,S] float32 (-inf where masked); same contract as `indexer_scores_block`.

    q [B,bq,H,D] bf16/f32; k [B,S,D] bf16/f32, or float8_e4m3fn with k_scale [B,S] float32 (real key =
    k * k_scale[..., None]); w [B,bq,H] float32; key_valid [B,S] bool; query_index [B,bq] int32; query_start
    [B,bq] int32 or None. A program holds blocks.block_rows query rows (block_q = block_rows // H queries,
    at least 16 rows) and blocks.block_k keys."""
    if not isinstance(blocks, IndexerScoresGpuBlocks):
        raise TypeError(f"indexer_scores_gpu: blocks must be IndexerScoresGpuBlocks, got {type(blocks).__name__}")
    B, T, H, D = q.shape
    Bk, S, Dk = k.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"indexer_scores_gpu: k {k.shape} does not match q {q.shape} ([B,S,D] vs [B,T,H,D])")
    if w.shape != (B, T, H) or query_index.shape != (B, T) or key_valid.shape != (B, S):
        raise ValueError(f"indexer_scores_gpu: w {w.shape}, query_index {query_index.shape}, key_valid "
                         f"{key_valid.shape} do not match q {q.shape} / k {k.shape}")
    if query_start is None:
        query_start = jnp.zeros((B, T), jnp.int32)
    if query_start.shape != (B, T):
        raise ValueError(f"indexer_scores_gpu: query_start {query_start.shape} must be [B,T] = {(B, T)}")
    is_fp8 = k.dtype == jnp.float8_e4m3fn
    if is_fp8 != (k_scale is not None):
        raise ValueError("indexer_scores_gpu: k_scale must be given exactly when k is float8_e4m3fn "
                         f"(k is {k.dtype}, k_scale is {'None' if k_scale is None else 'set'})")
    if k_scale is not None and k_scale.shape != (B, S):
        raise ValueError(f"indexer_scores_gpu: k_scale {k_scale.shape} must be [B,S] = {(B, S)}")
    block_k = blocks.block_k
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"indexer_scores_gpu: block_k={block_k} must be a power of two >= 16")

    # bf16 tensor-core dot when either side is bf16 (fp8 keys convert to bf16 exactly), else float32.
    compute_dtype = jnp.float32 if jnp.float32 in (q.dtype, k.dtype) else jnp.bfloat16
    Hp, Dp = _next_pow2(H), max(16, _next_pow2(D))
    block_q = min(_prev_pow2(max(1, blocks.block_rows // Hp)), _next_pow2(T))
    while block_q * Hp < 16:  # tensor-core dots need at least 16 rows
        block_q *= 2
    block_k = min(block_k, max(16, _next_pow2(S)))

    # Pad: heads/dims with zeros (zero weight -> no contribution), queries with query_index -1 (all masked,
    # sliced off), keys as invalid.
    if Hp != H:
        q = pad_axis(q, 2, Hp)
        w = pad_axis(w, 2, Hp)
    if Dp != D:
        q = pad_axis(q, 3, Dp)
        k = pad_axis(k, 2, Dp)
    q = pad_axis(q, 1, block_q)
    w = pad_axis(w.astype(jnp.float32), 1, block_q)
    qi = pad_axis(query_index.astype(jnp.int32), 1, block_q, value=-1)
    qs = pad_axis(query_start.astype(jnp.int32), 1, block_q, value=NO_START)
    k = pad_axis(k, 1, block_k)
    valid = pad_axis(key_valid.astype(jnp.int32), 1, block_k)
    Tp, Sp = q.shape[1], k.shape[1]
    nq, nk = Tp // block_q, Sp // block_k
    rows = block_q * Hp
    q2 = q.reshape(B, Tp * Hp, Dp)
    w2 = w.reshape(B, Tp * Hp)

    in_specs = [
        pl.BlockSpec((None, rows, Dp), lambda i, j, b: (b, i, 0)),
        pl.BlockSpec((None, block_k, Dp), lambda i, j, b: (b, j, 0)),
        pl.BlockSpec((None, rows), lambda i, j, b: (b, i)),
        pl.BlockSpec((None, block_k), lambda i, j, b: (b, j)),
        pl.BlockSpec((None, block_q), lambda i, j, b: (b, i)),
        pl.BlockSpec((None, block_q), lambda i, j, b: (b, i)),
    ]
    args = [q2, k, w2, valid, qi, qs]
    if is_fp8:
        in_specs.append(pl.BlockSpec((None, block_k), lambda i, j, b: (b, j)))
        args.append(pad_axis(k_scale.astype(jnp.float32), 1, block_k, value=1.0))
    kernel = functools.partial(_indexer_kernel, scale=float(scale), block_q=block_q, heads=Hp, block_k=block_k,
                               has_scale=is_fp8, compute_dtype=compute_dtype)
    flops = 2 * B * Tp * Hp * Dp * Sp
    bytes_accessed = (k.size * k.dtype.itemsize + q2.size * q2.dtype.itemsize * nk + B * Tp * Sp * 4)
    out = pl.pallas_call(
        kernel,
        grid=(nq, nk, B),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda i, j, b: (b, i, j)),
        out_shape=out_struct((B, Tp, Sp), jnp.float32, *args),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="dsa_indexer_scores",
    )(*args)
    return out[:, :T, :S]

