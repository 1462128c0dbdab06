"""Sparse MLA attention (absorbed form) on GPU: Pallas Triton forward and backward kernels (H100/H200).

Same contract as `sparse_mla_reference`: every query head attends over the latent rows its top-k indices
select (negative index = empty slot); the first v_dim dims of a row are its value.

Row split. Triton tiles must be powers of two and a GLM-5.2 row is 576 = 512 latent + 64 rope dims, so each
row is handled as two tiles, [:, :v_dim] (the latent, which is also the value) and [:, v_dim:] (the rope
part): the logits are the sum of two dots. v_dim and Dk - v_dim must be powers of two (>= 16).

Gather. No DMA or scalar prefetch in the Triton backend: a program loads its block_k indices as a vector
and gathers the rows with one vector-indexed load per part, `kv_ref[rows[:, None], cols[None, :]]`, masked
on the valid slots (empty slots cost no memory traffic). Each row is 1152 contiguous bytes (bf16), so the
loads coalesce per row.

Query blocks. Both passes walk the queries in blocks of bq = min(q_block, T) tokens (the caller's q_block,
as for every impl): lax.map forward, lax.scan backward with the float32 dkv accumulator as its carry. One
kernel call per block; the grids below are per call.

Forward. Grid `(bq, head_blocks, num_splits, B)`: one program per query token (block_h = 64 heads: all of
them at GLM-5.2, so each gathered row serves all heads) and per split of its K selected rows. A program
loops over its K / num_splits rows in blocks of block_k = 64 with an online softmax in float32:
- q tile [64, 512] + [64, 64] bf16: 72 KiB, loaded once;
- gathered rows [64, 512] + [64, 64] bf16: 72 KiB per step (staged through shared memory for the dots);
- logits / probabilities [64, 64] float32: 16 KiB; accumulator [64, 512] float32: 128 KiB, i.e. 128
  registers per thread at 8 warps (the dominant cost: lower block_h to 32 if ptxas reports spills).
num_splits (flash-decoding) keeps the GPU busy when B * bq is small (decode: B = 8, T = 1 is only 8 tokens):
each split writes a float32 partial output and its log-sum-exp, and XLA merges them (a few MiB at most).
With num_splits = 1 the kernel writes the final output directly. Default: enough splits for target_programs
= 132 programs (one per H200 SM), at least 4 blocks of rows per split.

Backward. Grid `(bq, head_blocks, B)`, block_h = 32 and block_k = 32 (tuned_blocks.json; the dq accumulator,
q and d_out stay resident: [32, 576] f32 + [32, 576] + [32, 512] bf16 = 140 KiB, plus the [32, 512] f32
row gradient of each step, 64 KiB). Per block of rows, the standard flash backward:
p = exp(s * scale - lse), dp = d_out . v, ds = p * (dp - delta), dq += scale * ds @ rows,
d_rows = scale * ds^T @ q (+ p^T @ d_out on the value dims).

dkv strategy: atomic float32 adds (`plgpu.atomic_add`) of d_rows straight into a [B, S + 1, Dk] float32
buffer (aliased in and out of the kernel; row S is a dump row for empty slots, which are also masked off on
GPU). Why not emit d_rows [B, bq, K, Dk] and scatter-add in XLA: that writes and re-reads 4.7 MiB per query
token (K = 2048 rows x 576 x 4 bytes; 302 MiB per 64-token block) and XLA's GPU scatter-add is itself a
loop of atomics, whereas in-kernel atomics issue the same adds once, straight from registers, into an
L2-resident row. Costs: float32 summation order is not deterministic, and rows chosen by many queries
(attention sinks, recent tokens) see atomic contention. The caller gets dkv in kv.dtype.

Quantized rows (forward only: a serving cache). kv may be `QuantizedRows`: the latent part as 8-bit values
with one float32 scale per row, the rope part unquantized. The kernel then takes the three arrays and
dequantizes each gathered block of rows in registers (values * scale, cast to q's dtype for the dots), so
a row costs 512 + 4 + 128 bytes of reads instead of 1152. kv [1, S, Dk] (forward only) is one pool of
rows that every batch row's indices point into: a paged cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import SparseMlaBwdGpuBlocks, SparseMlaFwdGpuBlocks
from pallas_kernels.common import (
    cdiv,
    check_q_block,
    from_query_blocks,
    map_query_blocks,
    match_varying,
    out_struct,
    pad_axis,
    to_query_blocks,
)
from pallas_kernels.quantize import QuantizedRows


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_shapes(name, q, kv, indices, v_dim, block_k):
    B, T, H, Dk = q.shape
    if kv.ndim != 3 or kv.shape[0] not in (B, 1) or kv.shape[2] != Dk:
        raise ValueError(f"{name}: kv {kv.shape} must be [B,S,Dk] matching q {q.shape} ([B,T,H,Dk])")
    if indices.ndim != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"{name}: indices {indices.shape} must be [B,T,K] matching q {q.shape}")
    if isinstance(kv, QuantizedRows):
        if kv.tail is None or kv.tail.dtype != q.dtype or kv.quantized_dims != v_dim or kv.packed or kv.tail_fold > 1:
            raise ValueError(f"{name}: quantized kv needs its first v_dim ({v_dim}) dims quantized and a tail "
                             f"(the rope dims) in q's dtype {q.dtype}, unpacked and unfolded (the GPU layout)")
    elif q.dtype != kv.dtype:
        raise ValueError(f"{name}: q ({q.dtype}) and kv ({kv.dtype}) must have the same dtype")
    rope = Dk - v_dim
    if not (_is_pow2(v_dim) and v_dim >= 16 and (rope == 0 or (_is_pow2(rope) and rope >= 16))):
        raise ValueError(f"{name}: the row is split into [:v_dim] and [v_dim:] tiles, and Triton needs both to be "
                         f"powers of two >= 16; got Dk={Dk}, v_dim={v_dim}")
    if not (_is_pow2(block_k) and block_k >= 16):
        raise ValueError(f"{name}: block_k={block_k} must be a power of two >= 16")


def _gather(kv_ref, idx, valid, start, width):
    """Rows kv_ref[idx, start:start+width] -> [len(idx), width]; zeros (and no load on GPU) for empty slots."""
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    ref = kv_ref.at[idx[:, None], cols]
    # A float fill: Triton casts it to any float row type (fp8 included), not an int one.
    return plgpu.load(ref, mask=valid[:, None], other=0.0 if jnp.issubdtype(kv_ref.dtype, jnp.floating) else 0)


def _qk(q_lat, q_rope, rows_lat, rows_rope):
    s = plgpu.dot(q_lat, rows_lat, trans_b=True)
    if q_rope is not None:
        s = s + plgpu.dot(q_rope, rows_rope, trans_b=True)
    return s


def _fwd_kernel(q_ref, *refs, scale, v_dim, rope, block_k, blocks_per_split, quantized):
    """refs: kv_ref, idx_ref, o_ref, lse_ref; quantized: values_ref [S, v_dim] (8-bit), scale_ref [S] float32
    and tail_ref [S, rope] (q's dtype) in place of kv_ref."""
    if quantized:
        values_ref, scale_ref, tail_ref, idx_ref, o_ref, lse_ref = refs
    else:
        kv_ref, idx_ref, o_ref, lse_ref = refs
    split = pl.program_id(2)
    q_lat = q_ref[:, pl.ds(0, v_dim)]
    q_rope = q_ref[:, pl.ds(v_dim, rope)] if rope else None
    bh = q_lat.shape[0]
    mm_dtype = q_ref.dtype

    def load_rows(rows, valid):
        if not quantized:
            return _gather(kv_ref, rows, valid, 0, v_dim), (_gather(kv_ref, rows, valid, v_dim, rope) if rope else None)
        # Only the selected rows are read; each is dequantized in registers (8-bit values times its scale).
        row_scale = plgpu.load(scale_ref.at[rows], mask=valid, other=0.0)
        lat = _gather(values_ref, rows, valid, 0, v_dim).astype(jnp.float32) * row_scale[:, None]
        return lat.astype(mm_dtype), (_gather(tail_ref, rows, valid, 0, rope) if rope else None)

    def body(i, carry):
        acc, m, l = carry
        base = (split * blocks_per_split + i) * block_k
        idx = idx_ref[pl.ds(base, block_k)]
        valid = idx >= 0
        rows = jnp.where(valid, idx, 0)
        rows_lat, rows_rope = load_rows(rows, valid)
        s = _qk(q_lat, q_rope, rows_lat, rows_rope) * scale
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(mm_dtype), rows_lat)
        return acc, m_new, l

    init = (jnp.zeros((bh, v_dim), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
            jnp.zeros((bh,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, blocks_per_split, body, init)
    m_use = jnp.where(m == -jnp.inf, 0.0, m)
    plgpu.store(lse_ref, m_use + jnp.log(l))  # -inf when no row was valid
    plgpu.store(o_ref, (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype))


def _default_splits(tokens, n_blocks, target_programs):
    """Splits for about target_programs programs (one per SM), each split keeping at least 4 blocks of rows
    (powers of two)."""
    want = _next_pow2(cdiv(target_programs, tokens))
    most = 1 << (max(1, n_blocks // 4).bit_length() - 1)
    return min(want, most)


def sparse_mla_fwd_gpu(q, kv, indices, *, scale: float, v_dim: int, q_block: int, blocks: SparseMlaFwdGpuBlocks,
                       num_splits: int | None = None, interpret: bool = False):
    """(out [B,T,H,v_dim] in q.dtype, lse [B,T,H] float32); same contract as `sparse_mla_reference`.

    Queries are walked in blocks of q_block (lax.map), one kernel call per block. num_splits: split-K factor
    (None: enough for blocks.target_programs programs per call)."""
    if not isinstance(blocks, SparseMlaFwdGpuBlocks):
        raise TypeError(f"sparse_mla_fwd_gpu: blocks must be SparseMlaFwdGpuBlocks, got {type(blocks).__name__}")
    _check_shapes("sparse_mla_fwd_gpu", q, kv, indices, v_dim, blocks.block_k)
    check_q_block(q_block)
    B, T, H, Dk = q.shape
    K = indices.shape[2]
    Hp = max(16, _next_pow2(H))  # tensor-core dots need >= 16 rows; padded heads have q = 0, sliced off
    block_h = min(blocks.block_h, Hp)
    if not (_is_pow2(block_h) and block_h >= 16):
        raise ValueError(f"sparse_mla_fwd_gpu: block_h={block_h} must be a power of two >= 16")
    block_k = min(blocks.block_k, max(16, _next_pow2(K)))
    n_blocks = cdiv(K, block_k)
    if num_splits is None:
        num_splits = _default_splits(B * min(q_block, T), n_blocks, blocks.target_programs)
    num_splits = max(1, min(num_splits, n_blocks))
    blocks_per_split = cdiv(n_blocks, num_splits)
    idx = pad_axis(indices.astype(jnp.int32), 2, num_splits * blocks_per_split * block_k, value=-1)
    call = functools.partial(_fwd_call, kv, scale=float(scale), v_dim=v_dim, block_k=block_k, block_h=block_h,
                             num_splits=num_splits, blocks_per_split=blocks_per_split, blocks=blocks,
                             interpret=interpret)
    out, lse = map_query_blocks(call, q_block, pad_axis(q, 2, Hp), idx, pad_values=(0, -1))
    return out[:, :, :H], lse[:, :, :H]


def _fwd_call(kv, qp, idx, *, scale, v_dim, block_k, block_h, num_splits, blocks_per_split, blocks, interpret):
    """One query block: qp [B,bq,Hp,Dk], idx [B,bq,Kp] -> out [B,bq,Hp,v_dim] (q.dtype), lse [B,bq,Hp] f32."""
    B, T, Hp, Dk = qp.shape
    S = kv.shape[1]
    rope = Dk - v_dim
    nh = Hp // block_h
    o_dtype = qp.dtype if num_splits == 1 else jnp.float32
    quantized = isinstance(kv, QuantizedRows)
    kernel = functools.partial(_fwd_kernel, scale=scale, v_dim=v_dim, rope=rope, block_k=block_k,
                               blocks_per_split=blocks_per_split, quantized=quantized)
    rows_read = B * T * nh * idx.shape[2]
    shared = kv.shape[0] == 1  # one pool of rows for every batch row (a paged cache)
    whole = lambda *shape: pl.BlockSpec(  # noqa: E731
        (None, S, *shape), lambda t, h, s, b: (0 if shared else b, 0) + (0,) * len(shape))
    if quantized:
        kv_args, kv_specs = tuple(kv), [whole(v_dim), whole(), whole(rope)]
        row_bytes = v_dim * kv.values.dtype.itemsize + 4 + rope * kv.tail.dtype.itemsize
    else:
        kv_args, kv_specs, row_bytes = (kv,), [whole(Dk)], Dk * kv.dtype.itemsize
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(T, nh, num_splits, B),
        in_specs=[
            pl.BlockSpec((None, None, block_h, Dk), lambda t, h, s, b: (b, t, h, 0)),
            *kv_specs,
            pl.BlockSpec((None, None, idx.shape[2]), lambda t, h, s, b: (b, t, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, v_dim), lambda t, h, s, b: (b, t, s, h, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda t, h, s, b: (b, t, s, h)),
        ],
        out_shape=[out_struct((B, T, num_splits, Hp, v_dim), o_dtype, qp, *kv_args, idx),
                   out_struct((B, T, num_splits, Hp), jnp.float32, qp, *kv_args, idx)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(flops=2 * rows_read * block_h * (Dk + v_dim),
                                      transcendentals=rows_read * block_h,
                                      bytes_accessed=rows_read * row_bytes + qp.size * qp.dtype.itemsize),
        interpret=interpret,
        name="sparse_mla_fwd",
    )(qp, *kv_args, idx)

    if num_splits == 1:
        return o_part[:, :, 0], lse_part[:, :, 0]
    # merge the splits' partial softmaxes
    lse = jnp.max(lse_part, axis=2)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    wgt = jnp.where(lse_part == -jnp.inf, 0.0, jnp.exp(lse_part - lse_safe[:, :, None]))  # [B,T,ns,Hp]
    tot = jnp.sum(wgt, axis=2)
    out = jnp.einsum("btsh,btshv->bthv", wgt, o_part) / jnp.where(tot > 0, tot, 1.0)[..., None]
    return out.astype(qp.dtype), lse_safe + jnp.log(tot)


def _bwd_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dkv_in_ref, dq_ref, dkv_ref, *, scale, v_dim,
                rope, block_k, n_blocks, dump_row, interpret):
    del dkv_in_ref  # aliased with dkv_ref
    q_lat = q_ref[:, pl.ds(0, v_dim)]
    q_rope = q_ref[:, pl.ds(v_dim, rope)] if rope else None
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    bh = q_lat.shape[0]
    mm_dtype = kv_ref.dtype

    def body(i, carry):
        dq_lat, dq_rope = carry
        idx = idx_ref[pl.ds(i * block_k, block_k)]
        valid = idx >= 0
        rows = jnp.where(valid, idx, 0)
        rows_lat = _gather(kv_ref, rows, valid, 0, v_dim)
        rows_rope = _gather(kv_ref, rows, valid, v_dim, rope) if rope else None
        s = _qk(q_lat, q_rope, rows_lat, rows_rope) * scale
        p = jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)  # [bh, block_k]
        dp = plgpu.dot(do, rows_lat, trans_b=True)
        ds = (p * (dp - delta[:, None])).astype(mm_dtype)
        dq_lat = dq_lat + plgpu.dot(ds, rows_lat)
        if rope:
            dq_rope = dq_rope + plgpu.dot(ds, rows_rope)
        d_lat = scale * plgpu.dot(ds, q_lat, trans_a=True) + plgpu.dot(p.astype(mm_dtype), do, trans_a=True)
        dst = jnp.where(valid, idx, dump_row)[:, None]
        mask = None if interpret else valid[:, None]  # the interpreter has no masked atomics: dump row instead
        cols = jax.lax.broadcasted_iota(jnp.int32, (1, v_dim), 1)
        plgpu.atomic_add(dkv_ref, (dst, cols), d_lat, mask=mask)
        if rope:
            d_rope = scale * plgpu.dot(ds, q_rope, trans_a=True)
            cols_r = v_dim + jax.lax.broadcasted_iota(jnp.int32, (1, rope), 1)
            plgpu.atomic_add(dkv_ref, (dst, cols_r), d_rope, mask=mask)
        return dq_lat, dq_rope

    init = (jnp.zeros((bh, v_dim), jnp.float32), jnp.zeros((bh, max(rope, 16)), jnp.float32))
    dq_lat, dq_rope = jax.lax.fori_loop(0, n_blocks, body, init)
    plgpu.store(dq_ref.at[:, pl.ds(0, v_dim)], (dq_lat * scale).astype(dq_ref.dtype))
    if rope:
        plgpu.store(dq_ref.at[:, pl.ds(v_dim, rope)], (dq_rope * scale).astype(dq_ref.dtype))


def sparse_mla_bwd_gpu(q, kv, indices, out, lse, d_out, *, scale: float, v_dim: int, q_block: int,
                       blocks: SparseMlaBwdGpuBlocks, interpret: bool = False):
    """(dq [B,T,H,Dk] in q.dtype, dkv [B,S,Dk] in kv.dtype) for `sparse_mla_fwd_gpu`'s (out, lse) and d_out.

    Queries are walked in blocks of q_block (lax.scan); the float32 dkv accumulator is the scan carry, passed
    to each block's kernel as an aliased input that its atomics add into."""
    if not isinstance(blocks, SparseMlaBwdGpuBlocks):
        raise TypeError(f"sparse_mla_bwd_gpu: blocks must be SparseMlaBwdGpuBlocks, got {type(blocks).__name__}")
    _check_shapes("sparse_mla_bwd_gpu", q, kv, indices, v_dim, blocks.block_k)
    check_q_block(q_block)
    B, T, H, Dk = q.shape
    S, K = kv.shape[1], indices.shape[2]
    if out.shape != (B, T, H, v_dim) or d_out.shape != out.shape or lse.shape != (B, T, H):
        raise ValueError(f"sparse_mla_bwd_gpu: out {out.shape}, d_out {d_out.shape}, lse {lse.shape} do not match "
                         f"q {q.shape} and v_dim={v_dim}")
    rope = Dk - v_dim
    Hp = max(16, _next_pow2(H))
    block_h = min(blocks.block_h, Hp)
    if not (_is_pow2(block_h) and block_h >= 16):
        raise ValueError(f"sparse_mla_bwd_gpu: block_h={block_h} must be a power of two >= 16")
    block_k = min(blocks.block_k, max(16, _next_pow2(K)))
    idx = pad_axis(indices.astype(jnp.int32), 2, block_k, value=-1)
    n_blocks = idx.shape[2] // block_k
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    # Padded heads: q = 0, d_out = 0, delta = 0, lse = 0 -> ds = 0 and p^T d_out = 0, so they add nothing.
    # Padded queries (last query block): no valid slot, so they add nothing either.
    bq = min(q_block, T)
    xs = (to_query_blocks(pad_axis(q, 2, Hp), bq), to_query_blocks(idx, bq, -1),
          to_query_blocks(pad_axis(d_out.astype(kv.dtype), 2, Hp), bq),
          to_query_blocks(pad_axis(lse.astype(jnp.float32), 2, Hp), bq), to_query_blocks(pad_axis(delta, 2, Hp), bq))
    nh = Hp // block_h
    kernel = functools.partial(_bwd_kernel, scale=float(scale), v_dim=v_dim, rope=rope, block_k=block_k,
                               n_blocks=n_blocks, dump_row=S, interpret=interpret)
    rows_read = B * bq * nh * idx.shape[2]
    call = pl.pallas_call(
        kernel,
        grid=(bq, nh, B),
        in_specs=[
            pl.BlockSpec((None, None, block_h, Dk), lambda t, h, b: (b, t, h, 0)),
            pl.BlockSpec((None, S, Dk), lambda t, h, b: (b, 0, 0)),
            pl.BlockSpec((None, None, idx.shape[2]), lambda t, h, b: (b, t, 0)),
            pl.BlockSpec((None, None, block_h, v_dim), lambda t, h, b: (b, t, h, 0)),
            pl.BlockSpec((None, None, block_h), lambda t, h, b: (b, t, h)),
            pl.BlockSpec((None, None, block_h), lambda t, h, b: (b, t, h)),
            pl.BlockSpec((None, S + 1, Dk), lambda t, h, b: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, Dk), lambda t, h, b: (b, t, h, 0)),
            pl.BlockSpec((None, S + 1, Dk), lambda t, h, b: (b, 0, 0)),
        ],
        out_shape=[out_struct((B, bq, Hp, Dk), q.dtype, kv, *xs), out_struct((B, S + 1, Dk), jnp.float32, kv, *xs)],
        input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(flops=2 * rows_read * block_h * (3 * Dk + 2 * v_dim),
                                      transcendentals=rows_read * block_h,
                                      bytes_accessed=rows_read * Dk * (kv.dtype.itemsize + 4)),
        interpret=interpret,
        name="sparse_mla_bwd",
    )

    def step(dkv, xs):
        qb, ib, dob, lb, db = xs
        dq, dkv = call(qb, kv, ib, dob, lb, db, dkv)
        return dkv, dq

    dkv0 = match_varying(jnp.zeros((B, S + 1, Dk), jnp.float32), kv, *xs)  # row S: dump row for empty slots
    dkv, dq = jax.lax.scan(step, dkv0, xs)
    return from_query_blocks(dq, T)[:, :, :H], dkv[:, :S].astype(kv.dtype)
