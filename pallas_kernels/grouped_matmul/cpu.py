"""Grouped matmul for CPU: a loop over row tiles that computes only the routed rows.

XLA:CPU has no ragged kernel: `lax.ragged_dot` lowers to a dense matmul of every row against every group,
G times the useful work (with 32 experts that made the MoE, and the whole prefill, several times slower than
transformers). Rows arrive sorted by group, so each group is a contiguous row range. The range is covered by
row tiles of `tm` rows; a tile that straddles a group boundary is visited once per group it touches, and each
visit writes only its group's rows. At most cdiv(M, tm) + G - 1 tiles are visited, and the trip count is the
actual number (a `while` loop), so rows past sum(group_sizes) cost nothing. Each loop step takes `pv`
consecutive visits as one batched product ([pv, tm, K] rows against the [pv, K, N] matrices of their groups):
ops inside a loop body run one after the other, and one small matmul per step is the slowest way to spend
the step.

Forward and backward are both such loops, joined by a custom_vjp: dlhs is the same product against rhs
transposed, drhs[g] accumulates tile(lhs).T @ tile(dout). (Autodiff of the loop would save a weight
matrix per visited tile.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import cdiv


def tile_plan(group_sizes: jax.Array, m: int, tm: int):
    """The tiles to visit, in order: (group_ids [V], tile_ids [V], num_visits, starts [G], ends [G]),
    V = cdiv(m, tm) + G - 1 (static bound), entries past num_visits unused."""
    G = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tm
    count = jnp.where(group_sizes > 0, (ends - 1) // tm - first + 1, 0)
    V = cdiv(m, tm) + G - 1
    group_ids = jnp.repeat(jnp.arange(G, dtype=jnp.int32), count, total_repeat_length=V)
    begin = jnp.cumsum(count) - count  # index of each group's first visit
    tile_ids = first[group_ids] + jnp.arange(V, dtype=jnp.int32) - begin[group_ids]
    return group_ids, tile_ids, count.sum(), starts, ends


def varying_like(init: jax.Array, *refs: jax.Array) -> jax.Array:
    """init, marked as varying over every manual mesh axis any of refs varies over: inside shard_map a loop
    carry must keep one type, and the body's results vary wherever its inputs do."""
    axes = set()
    for r in refs:
        axes |= set(jax.typeof(r).manual_axis_type.varying)
    axes -= set(jax.typeof(init).manual_axis_type.varying)
    return jax.lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def _pad_rows(x: jax.Array, tm: int) -> jax.Array:
    extra = cdiv(x.shape[0], tm) * tm - x.shape[0]
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def _pad_visits(group_ids, tile_ids, pv: int):
    """The visit arrays padded to a multiple of pv (the padding repeats the last entry and is masked out)."""
    extra = cdiv(group_ids.shape[0], pv) * pv - group_ids.shape[0]
    return jnp.pad(group_ids, (0, extra), mode="edge"), jnp.pad(tile_ids, (0, extra), mode="edge")


def _step_visits(group_ids, tile_ids, visits, starts, ends, j, tm: int, pv: int):
    """Visits j*pv .. j*pv+pv-1 -> (groups [pv], first rows [pv], rows [pv, tm], mine [pv, tm, 1]: which of
    those rows each visit owns; none for the padding past `visits`)."""
    g = lax.dynamic_slice_in_dim(group_ids, j * pv, pv)
    r0 = lax.dynamic_slice_in_dim(tile_ids, j * pv, pv) * tm
    rid = r0[:, None] + jnp.arange(tm, dtype=jnp.int32)[None, :]
    live = (j * pv + jnp.arange(pv, dtype=jnp.int32) < visits)[:, None]
    mine = live & (rid >= starts[g][:, None]) & (rid < ends[g][:, None])
    return g, r0, rid, mine[..., None]


def _gmm(lhs, rhs, group_sizes, tm: int, transpose_rhs: bool, pv: int):
    """[M,K] x [G,K,N] (or [G,N,K]) -> [M,N] float32; rows outside every group are 0."""
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    group_ids, tile_ids, visits, starts, ends = tile_plan(group_sizes, m, tm)
    group_ids, tile_ids = _pad_visits(group_ids, tile_ids, pv)
    lhs_p = _pad_rows(lhs, tm)
    eq = "ptk,pnk->ptn" if transpose_rhs else "ptk,pkn->ptn"

    def body(j, out):
        g, r0, rid, mine = _step_visits(group_ids, tile_ids, visits, starts, ends, j, tm, pv)
        y = jnp.einsum(eq, lhs_p[rid], rhs[g], preferred_element_type=jnp.float32)  # [pv, tm, N]
        for p in range(pv):  # in visit order: two visits of one straddling tile write different rows
            old = lax.dynamic_slice_in_dim(out, r0[p], tm)
            out = lax.dynamic_update_slice_in_dim(out, jnp.where(mine[p], y[p], old), r0[p], 0)
        return out

    init = varying_like(jnp.zeros((lhs_p.shape[0], n), jnp.float32), lhs, rhs, group_sizes)
    out = lax.fori_loop(0, cdiv(visits, pv), body, init)
    return out[:m]


def _tgmm(lhs, dout, group_sizes, num_groups: int, tm: int, pv: int):
    """[M,K], [M,N] -> [G,K,N] float32: out[g] = lhs[rows of g].T @ dout[rows of g] (0 for empty groups)."""
    m, k = lhs.shape
    n = dout.shape[1]
    group_ids, tile_ids, visits, starts, ends = tile_plan(group_sizes, m, tm)
    group_ids, tile_ids = _pad_visits(group_ids, tile_ids, pv)
    lhs_p, dout_p = _pad_rows(lhs, tm), _pad_rows(dout, tm)

    def body(j, acc):
        g, _, rid, mine = _step_visits(group_ids, tile_ids, visits, starts, ends, j, tm, pv)
        x = jnp.where(mine, lhs_p[rid], 0)
        upd = jnp.einsum("ptk,ptn->pkn", x, dout_p[rid], preferred_element_type=jnp.float32)
        for p in range(pv):
            acc = lax.dynamic_update_index_in_dim(acc, lax.dynamic_index_in_dim(acc, g[p], keepdims=False) + upd[p],
                                                  g[p], 0)
        return acc

    init = varying_like(jnp.zeros((num_groups, k, n), jnp.float32), lhs, dout, group_sizes)
    return lax.fori_loop(0, cdiv(visits, pv), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def gmm_tiled(lhs, rhs, group_sizes, tm: int, transpose_rhs: bool, out_dtype, pv: int = 1):
    """lhs [M,K], rhs [G,K,N] ([G,N,K] with transpose_rhs), group_sizes [G] int32 -> [M,N] out_dtype.
    pv: visits per loop step (one batched product)."""
    return _gmm(lhs, rhs, group_sizes, tm, transpose_rhs, pv).astype(out_dtype)


def _fwd(lhs, rhs, group_sizes, tm, transpose_rhs, out_dtype, pv):
    return gmm_tiled(lhs, rhs, group_sizes, tm, transpose_rhs, out_dtype, pv), (lhs, rhs, group_sizes)


def _bwd(tm, transpose_rhs, out_dtype, pv, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(jnp.promote_types(lhs.dtype, rhs.dtype))
    dlhs = _gmm(dout, rhs, group_sizes, tm, not transpose_rhs, pv).astype(lhs.dtype)
    if transpose_rhs:  # rhs [G,N,K]: drhs[g] = dout_g.T @ lhs_g
        drhs = _tgmm(dout, lhs, group_sizes, rhs.shape[0], tm, pv)
    else:
        drhs = _tgmm(lhs, dout, group_sizes, rhs.shape[0], tm, pv)
    return dlhs, drhs.astype(rhs.dtype), None


gmm_tiled.defvjp(_fwd, _bwd)
