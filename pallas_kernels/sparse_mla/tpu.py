"""Sparse MLA attention on TPU (Pallas Mosaic): gather the selected rows in XLA, then dense flash attention.

Semantics are exactly `sparse_mla_reference` (forward) and its gradient (backward); shapes as there:
q [B, T, H, Dk], kv [B, S, Dk], indices [B, T, K] int32 (negative = empty slot), out [B, T, H, v_dim] in
q.dtype, lse [B, T, H] float32 (zeros / -inf for a query with no valid row). Forward only: kv may be
[1, S, Dk], one pool of rows for every batch row (a paged cache), or QuantizedRows.

Design
------
* Query blocks. `T` is cut into blocks of `bq = min(q_block, T)` tokens (the caller's q_block, the same
  for every impl), walked with `lax.map` (forward) or `lax.scan` (backward, the dkv accumulator is its
  carry), so only one block's gathered rows exist at a time: [B, bq, K, Dp] (bq = 64, K = 2048, Dp = 640,
  bf16: 168 MB); nothing is [T, K, Dk] or [T, S].
* Gather in XLA. Per block, `kv[b, clip(idx)]` is a plain XLA gather: on v5p XLA offloads it to the
  SparseCore. Static v5p estimates put gather-then-dense about 12x faster than one row DMA per selected token
  issued from the TensorCore (issue cost dominates), and bf16 rows cannot be DMA'd one at a time anyway.
* Row width. Rows are padded to Dp = round_up(Dk, 128) lanes (576 -> 640), q with zeros alike, so the
  kernel's matmuls are lane-aligned. The padded columns never change a result (q's pad is zero, values are
  the first v_dim columns) and their gradient is zero. Where the padding happens is chosen statically: the
  whole cache once per call when the call gathers at least as many rows as the cache has (prefill/training,
  T * K >= S), else each block's gathered rows (decode).
* Cache layout (measured, v5p AOT): a [1, 131072, 576] bf16 argument that is only gathered from gets the
  entry layout major_to_minor (0, 2, 1), i.e. the token axis minor ("column-major"); a caller holding the
  cache in the default row-major layout pays a relayout copy of the whole cache per call. At width 640 the
  entry layout is row-major (0, 1, 2). So a serving KV cache should be stored 640 wide: this module accepts
  `kv` of width round_up(Dk, 128) as well as Dk (extra columns are ignored, their dkv is zero, dkv has kv's
  width). Inside a training jit, where kv is computed right before, XLA picks the layout itself.
* Tokens are independent, so the kernels see B * bq tokens as one axis N: q [N, H, Dp], rows [N, K, Dp],
  slot ids [N, 1, K] (the 1 keeps every block's last two dims full or lane-aligned for any token count).
  Grid (N / tq, K / kb): ("parallel", "arbitrary"); tq tokens per step, kb = k_block rows per token per step.
* Forward kernel: s = scale * q[t] @ rows[t]^T for the tq tokens of a step (a batched MXU matmul, H = 64
  rows each), masked where the slot is empty, online softmax with m, l, acc in float32 VMEM scratch,
  acc += p @ rows[:, :v_dim]; the last k step writes out and lse. Empty-slot masking uses a finite floor
  (-1e30) plus an explicit p = 0, so an all-empty block or query never makes NaN.
* Backward: per block, delta = sum(d_out * out) in XLA; q and d_out (zero-padded to Dp) are stacked into
  qd [N, 2H, Dp] so that one matmul qd @ rows^T gives both s and dp = d_out @ v^T, and one matmul
  [scale * ds; p]^T @ qd gives d_rows = scale * ds^T q + p^T d_out: 2H = 128 rows/contraction depth fill the
  v5p MXU (H = 64 alone would fill half). p is recomputed from lse. dq is accumulated over k steps in VMEM
  (float32); d_rows [N, K, Dp] float32 goes to HBM and XLA scatter-adds it into a float32 [B, S, Dp] dkv
  carried across query blocks (empty slots and padding tokens are sent out of bounds and dropped).
* Each pallas_call carries a `pl.CostEstimate` (cost_analysis does not look inside Pallas kernels).

Block sizes (tuned_blocks.json: k_block and rows_per_step = tq * kb) and VMEM per grid step (`vmem_bytes_fwd`
/ `vmem_bytes_bwd`; double-buffered blocks, scratch, and the float32 intermediates; H = 64, Dp = 640,
v_dim = 512, bf16):
* forward: tq = 4096 // kb tokens per step (tq = 8 at kb = 512: 4096 rows, 512 MXU LHS rows): 18.3 MiB.
* backward: tq = 2048 // kb (tq = 4 at kb = 512): 29.6 MiB (the float32 d_rows block is 5 MiB, twice).
tq is lowered to a divisor of the B * bq tokens of a block when it does not divide them.
Measured (smallest vmem_limit_bytes with which Mosaic still compiles the kernel, by bisection, these blocks):
v5p forward 20.1 MiB, backward 20.5 MiB; v6e forward 14.5 MiB, backward 16.8 MiB. vmem_limit_bytes is set to
1.25x the estimate, at least 32 MiB, at most 100 MiB (so 32 MiB forward, 37 MiB backward), under v5p's
64 MiB and v6e's 128 MiB of VMEM per core (`pltpu.get_tpu_info_for_chip`).

Compile results (ahead of time on this CPU host, jax 0.12.0.1, libtpu; `memory_analysis()` per chip, bytes;
one q block of bq = 64 for the prefill shapes):

    shape (bf16, K = 2048, H = 64)          pass   kv width   v5p temp / argument    v6e temp / argument
    q [1,64]   kv [1,8192]                  fwd    576          358 M /   15 M         336 M /   15 M
    q [1,256]  kv [1,8192]   (4 q blocks)   fwd    576          214 M /   30 M           -
    q [1,64]   kv [1,131072]                fwd    576          336 M /  157 M         336 M /  157 M
    q [1,64]   kv [1,8192]                  bwd    576          880 M /   24 M         870 M /   24 M
    q [1,64]   kv [1,131072]                bwd    576          676 M /  165 M        1007 M /  165 M
    q [8,1]    kv [8,131072]  (decode)      fwd    576         1364 M / 1209 M        1363 M / 1209 M
    q [1,1]    kv [1,1048576] (decode)      fwd    576         1345 M / 1208 M        1345 M / 1208 M
    q [1,1]    kv [1,1048576] (decode)      fwd    640            2.9 M / 1342 M         2.9 M / 1342 M

The prefill temporaries are one block's gathered rows (168 MB) plus, backward, its float32 d_rows (336 MB)
and the float32 dkv accumulator (B*S*640*4: 335 MB at 128K); four query blocks need no more than one. The
576-wide decode temporaries are a whole-cache relayout copy (the (0, 2, 1) entry layout, see above), gone
when the cache is stored 640 wide. Compile time on the 2-core host: 1-3 s forward, 2-11 s backward.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocks import SparseMlaBwdTpuBlocks, SparseMlaFwdTpuBlocks
from pallas_kernels.common import cdiv, check_q_block, gather_rows, match_varying, out_struct, pad_axis
from pallas_kernels.quantize import QuantizedRows

LANES = 128
MASK_FLOOR = -1e30  # finite stand-in for -inf in the running max
MIN_VMEM_LIMIT = 32 * 2**20
MAX_VMEM_LIMIT = 100 * 2**20


def _round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


def _plan(B: int, T: int, K: int, q_block: int, k_block: int, rows_per_step: int):
    """Block sizes: (bq tokens per query block, T padded to a multiple of bq, kb, K padded, tq tokens/step).

    bq = min(q_block, T) exactly; tq is the largest divisor of the B * bq tokens of a block that keeps
    tq * kb <= rows_per_step (so no token padding; an odd token count only makes the steps smaller)."""
    check_q_block(q_block)
    kb = min(k_block, K)
    K_pad = _round_up(K, kb)
    bq = min(q_block, T)
    n = B * bq  # tokens per kernel call
    tq = max(1, min(rows_per_step // kb, n))
    while n % tq:
        tq -= 1
    T_pad = _round_up(T, bq)
    return bq, T_pad, kb, K_pad, tq


def _check(q, kv, indices, v_dim):
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"sparse_mla_tpu: want q [B,T,H,Dk], kv [B,S,Dk], indices [B,T,K]; got q {q.shape}, "
                         f"kv {kv.shape}, indices {indices.shape}")
    B, T, H, Dk = q.shape
    if kv.shape[0] not in (B, 1) or indices.shape[:2] != (B, T):
        raise ValueError(f"sparse_mla_tpu: batch/seq mismatch: q {q.shape}, kv {kv.shape}, indices {indices.shape}")
    Dp = _round_up(Dk, LANES)
    if kv.shape[2] not in (Dk, Dp):
        raise ValueError(f"sparse_mla_tpu: kv width {kv.shape[2]} must be q's Dk ({Dk}) or Dk padded to "
                         f"{LANES} lanes ({Dp})")
    quantized = isinstance(kv, QuantizedRows)
    if quantized and (kv.tail is None or kv.tail.dtype != q.dtype or kv.quantized_dims != v_dim):
        raise ValueError(f"sparse_mla_tpu: quantized kv needs its first v_dim ({v_dim}) dims quantized and a "
                         f"tail (the rope dims) in q's dtype {q.dtype}")
    if not quantized and q.dtype != kv.dtype:
        raise ValueError(f"sparse_mla_tpu: q ({q.dtype}) and kv ({kv.dtype}) must have one dtype")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"sparse_mla_tpu: indices must be integers, got {indices.dtype}")
    if not 0 < v_dim <= Dk:
        raise ValueError(f"sparse_mla_tpu: v_dim {v_dim} must be in (0, Dk={Dk}]")
    return B, T, H, Dk, Dp


def _blocks(x, T_pad: int, bq: int, value):
    """[B, T, ...] -> [nb, B, bq, ...], padding T with `value`."""
    x = pad_axis(x, 1, T_pad, value) if x.shape[1] != T_pad else x
    B = x.shape[0]
    return jnp.moveaxis(x.reshape(B, T_pad // bq, bq, *x.shape[2:]), 1, 0)


def _unblock(y, T: int):
    """[nb, B, bq, ...] -> [B, T, ...]."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :T]


def _pad_cache_first(S: int, T_pad: int, K_pad: int) -> bool:
    """Pad the cache to Dp once per call (a copy of B*S rows) rather than each block's gathered rows (B*T*K rows
    in all): the cheaper of the two. Prefill/training (T*K >> S) pads the cache, decode pads the rows."""
    return T_pad * K_pad >= S


def _gather_rows(kv, idx, Dp: int, dtype):
    """kv [B, S, D] (or QuantizedRows, dequantized to dtype in the gather's fusion), idx [B, bq, K] -> rows
    [B, bq, K, Dp] (XLA gather; empty slots read row 0, masked later)."""
    return pad_axis(gather_rows(kv, idx, dtype), 3, Dp)


def vmem_bytes_fwd(tq: int, kb: int, H: int, Dp: int, v_dim: int, itemsize: int) -> int:
    """VMEM of one forward grid step: double-buffered blocks, scratch, float32 intermediates."""
    v = _round_up(v_dim, LANES)
    blocks = tq * kb * 4 + tq * H * Dp * itemsize + tq * kb * Dp * itemsize + tq * H * v * itemsize + tq * H * LANES * 4
    scratch = tq * H * v * 4 + 2 * tq * H * LANES * 4
    temps = 3 * tq * H * kb * 4 + tq * H * v * 4  # s, p (f32 and cast), p @ v
    return 2 * blocks + scratch + temps


def vmem_bytes_bwd(tq: int, kb: int, H: int, Dp: int, itemsize: int) -> int:
    """VMEM of one backward grid step: double-buffered blocks, scratch, float32 intermediates."""
    blocks = (tq * kb * 4 + tq * 2 * H * Dp * itemsize + tq * kb * Dp * itemsize + 2 * tq * H * LANES * 4
              + tq * H * Dp * itemsize + tq * kb * Dp * 4)
    scratch = tq * H * Dp * 4
    temps = 6 * tq * 2 * H * kb * 4 + tq * H * Dp * 4 + tq * kb * Dp * 4
    return 2 * blocks + scratch + temps


def _vmem_limit(estimate: int) -> int:
    return int(min(max(estimate * 5 // 4, MIN_VMEM_LIMIT), MAX_VMEM_LIMIT))


# ----------------------------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, q_ref, rows_ref, out_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, v_dim):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_FLOOR, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q = q_ref[...]  # [tq, H, Dp]
    rows = rows_ref[...]  # [tq, kb, Dp]
    valid = idx_ref[...] >= 0  # [tq, 1, kb]
    s = lax.dot_general(q, rows, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid, s, MASK_FLOOR)  # [tq, H, kb]
    m_prev = m_sc[...]  # [tq, H, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    pv = lax.dot_general(p.astype(rows.dtype), rows[:, :, :v_dim], (((2,), (1,)), ((0,), (0,))),
                         preferred_element_type=jnp.float32)  # [tq, H, v]
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = m_new

    @pl.when(k == pl.num_programs(1) - 1)
    def _finish():
        l = l_sc[...]
        has = l > 0.0
        l_safe = jnp.where(has, l, 1.0)
        out_ref[...] = jnp.where(has, acc_sc[...] / l_safe, 0.0).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def _fwd_call(q, rows, slots, *, scale, v_dim, kb, tq, interpret):
    """q [N, H, Dp], rows [N, K, Dp], slots [N, 1, K] -> out [N, H, v_dim], lse [N, H, 1] (float32)."""
    N, H, Dp = q.shape
    K = rows.shape[1]
    isz = q.dtype.itemsize
    grid = (N // tq, K // kb)
    cost = pl.CostEstimate(
        flops=2 * N * H * K * (Dp + v_dim),
        transcendentals=N * H * K,
        bytes_accessed=N * K * (Dp * isz + 4) + N * H * (Dp * isz + v_dim * isz + 4),
    )
    vmem = vmem_bytes_fwd(tq, kb, H, Dp, v_dim, isz)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, v_dim=v_dim),
        grid=grid,
        in_specs=[
            pl.BlockSpec((tq, 1, kb), lambda i, k: (i, 0, k)),
            pl.BlockSpec((tq, H, Dp), lambda i, k: (i, 0, 0)),
            pl.BlockSpec((tq, kb, Dp), lambda i, k: (i, k, 0)),
        ],
        out_specs=[
            pl.BlockSpec((tq, H, v_dim), lambda i, k: (i, 0, 0)),
            pl.BlockSpec((tq, H, 1), lambda i, k: (i, 0, 0)),
        ],
        out_shape=[out_struct((N, H, v_dim), q.dtype, slots, q, rows),
                   out_struct((N, H, 1), jnp.float32, slots, q, rows)],
        scratch_shapes=[
            pltpu.VMEM((tq, H, 1), jnp.float32),
            pltpu.VMEM((tq, H, 1), jnp.float32),
            pltpu.VMEM((tq, H, v_dim), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(vmem)),
        cost_estimate=cost,
        interpret=interpret,
        name="sparse_mla_fwd",
    )(slots, q, rows)


def sparse_mla_fwd_tpu(q, kv, indices, *, scale: float, v_dim: int, q_block: int, blocks: SparseMlaFwdTpuBlocks,
                       interpret: bool = False):
    """Forward sparse MLA (see module doc), walking the queries in blocks of q_block. Returns out [B, T, H, v_dim]
    (q.dtype), lse [B, T, H] float32."""
    if not isinstance(blocks, SparseMlaFwdTpuBlocks):
        raise TypeError(f"sparse_mla_fwd_tpu: blocks must be SparseMlaFwdTpuBlocks, got {type(blocks).__name__}")
    B, T, H, Dk, Dp = _check(q, kv, indices, v_dim)
    K = indices.shape[2]
    bq, T_pad, kb, K_pad, tq = _plan(B, T, K, q_block, blocks.k_block, blocks.rows_per_step)
    indices = pad_axis(indices.astype(jnp.int32), 2, K_pad, -1)
    q_blocks = _blocks(pad_axis(q, 3, Dp), T_pad, bq, 0)  # [nb, B, bq, H, Dp]
    idx_blocks = _blocks(indices, T_pad, bq, -1)  # [nb, B, bq, K_pad]
    N = B * bq
    if not isinstance(kv, QuantizedRows) and kv.shape[2] != Dp and _pad_cache_first(kv.shape[1], T_pad, K_pad):
        kv = pad_axis(kv, 2, Dp)

    def one_block(xs):
        qb, ib = xs
        rows = _gather_rows(kv, ib, Dp, q.dtype).reshape(N, K_pad, Dp)
        out, lse = _fwd_call(qb.reshape(N, H, Dp), rows, ib.reshape(N, 1, K_pad), scale=scale, v_dim=v_dim,
                             kb=kb, tq=tq, interpret=interpret)
        return out.reshape(B, bq, H, v_dim), lse.reshape(B, bq, H)

    out, lse = lax.map(one_block, (q_blocks, idx_blocks))
    return _unblock(out, T), _unblock(lse, T)


# ---------------------------------------------------------------------------------------------- backward


def _bwd_kernel(idx_ref, qd_ref, rows_ref, lse_ref, delta_ref, dq_ref, drows_ref, dq_sc, *, scale, H):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    qd = qd_ref[...]  # [tq, 2H, Dp]: q stacked over d_out (zero-padded to Dp)
    rows = rows_ref[...]  # [tq, kb, Dp]
    valid = idx_ref[...] >= 0  # [tq, 1, kb]
    sd = lax.dot_general(qd, rows, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    s = sd[:, :H] * scale  # [tq, H, kb]
    dp = sd[:, H:]  # d_out @ v^T
    p = jnp.where(valid, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (dp - delta_ref[...]) * scale  # d(loss)/d(q.k), scale folded in
    ds_c = ds.astype(rows.dtype)
    dq_sc[...] += lax.dot_general(ds_c, rows, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    lhs = jnp.swapaxes(jnp.concatenate([ds_c, p.astype(rows.dtype)], axis=1), 1, 2)  # [tq, kb, 2H]
    drows_ref[...] = lax.dot_general(lhs, qd, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(1) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _bwd_call(qd, rows, slots, lse, delta, *, scale, kb, tq, interpret):
    """qd [N, 2H, Dp], rows [N, K, Dp], slots [N, 1, K], lse/delta [N, H, 1] -> dq [N, H, Dp], d_rows f32."""
    N, H2, Dp = qd.shape
    H = H2 // 2
    K = rows.shape[1]
    isz = qd.dtype.itemsize
    grid = (N // tq, K // kb)
    cost = pl.CostEstimate(
        flops=2 * N * K * Dp * (2 * H + H + 2 * H),
        transcendentals=N * H * K,
        bytes_accessed=N * K * (Dp * isz + Dp * 4 + 4) + N * H * (2 * Dp * isz + Dp * isz + 8),
    )
    vmem = vmem_bytes_bwd(tq, kb, H, Dp, isz)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, H=H),
        grid=grid,
        in_specs=[
            pl.BlockSpec((tq, 1, kb), lambda i, k: (i, 0, k)),
            pl.BlockSpec((tq, H2, Dp), lambda i, k: (i, 0, 0)),
            pl.BlockSpec((tq, kb, Dp), lambda i, k: (i, k, 0)),
            pl.BlockSpec((tq, H, 1), lambda i, k: (i, 0, 0)),
            pl.BlockSpec((tq, H, 1), lambda i, k: (i, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((tq, H, Dp), lambda i, k: (i, 0, 0)),
            pl.BlockSpec((tq, kb, Dp), lambda i, k: (i, k, 0)),
        ],
        out_shape=[out_struct((N, H, Dp), qd.dtype, slots, qd, rows, lse, delta),
                   out_struct((N, K, Dp), jnp.float32, slots, qd, rows, lse, delta)],
        scratch_shapes=[pltpu.VMEM((tq, H, Dp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(vmem)),
        cost_estimate=cost,
        interpret=interpret,
        name="sparse_mla_bwd",
    )(slots, qd, rows, lse, delta)


def sparse_mla_bwd_tpu(q, kv, indices, out, lse, d_out, *, scale: float, v_dim: int, q_block: int,
                       blocks: SparseMlaBwdTpuBlocks, interpret: bool = False):
    """Gradients of sparse MLA given the forward's out and lse: dq like q, dkv like kv (float32 accumulation
    across the query blocks of q_block)."""
    if not isinstance(blocks, SparseMlaBwdTpuBlocks):
        raise TypeError(f"sparse_mla_bwd_tpu: blocks must be SparseMlaBwdTpuBlocks, got {type(blocks).__name__}")
    B, T, H, Dk, Dp = _check(q, kv, indices, v_dim)
    S, Dkv = kv.shape[1], kv.shape[2]
    K = indices.shape[2]
    if out.shape != (B, T, H, v_dim) or d_out.shape != out.shape or lse.shape != (B, T, H):
        raise ValueError(f"sparse_mla_bwd_tpu: want out/d_out {(B, T, H, v_dim)} and lse {(B, T, H)}; got out "
                         f"{out.shape}, d_out {d_out.shape}, lse {lse.shape}")
    bq, T_pad, kb, K_pad, tq = _plan(B, T, K, q_block, blocks.k_block, blocks.rows_per_step)
    indices = pad_axis(indices.astype(jnp.int32), 2, K_pad, -1)
    N = B * bq
    if kv.shape[2] != Dp and _pad_cache_first(S, T_pad, K_pad):
        kv = pad_axis(kv, 2, Dp)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H]
    qd = jnp.concatenate([pad_axis(q, 3, Dp), pad_axis(d_out.astype(q.dtype), 3, Dp)], axis=2)  # [B,T,2H,Dp]
    xs = (_blocks(qd, T_pad, bq, 0), _blocks(indices, T_pad, bq, -1), _blocks(lse.astype(jnp.float32), T_pad, bq, 0),
          _blocks(delta, T_pad, bq, 0))
    b_ids = jnp.arange(B, dtype=jnp.int32)[:, None, None]

    def step(dkv_acc, xs):
        qdb, ib, lb, db = xs
        rows = _gather_rows(kv, ib, Dp, q.dtype).reshape(N, K_pad, Dp)
        dq, drows = _bwd_call(qdb.reshape(N, 2 * H, Dp), rows, ib.reshape(N, 1, K_pad), lb.reshape(N, H, 1),
                              db.reshape(N, H, 1), scale=scale, kb=kb, tq=tq, interpret=interpret)
        target = jnp.where(ib >= 0, jnp.clip(ib, 0, S - 1), S)  # empty slots -> out of bounds -> dropped
        dkv_acc = dkv_acc.at[b_ids, target].add(drows.reshape(B, bq, K_pad, Dp), mode="drop")
        return dkv_acc, dq.reshape(B, bq, H, Dp)

    dkv, dq = lax.scan(step, match_varying(jnp.zeros((B, S, Dp), jnp.float32), kv, *xs), xs)
    return _unblock(dq, T)[..., :Dk], dkv[..., :Dkv].astype(kv.dtype)
