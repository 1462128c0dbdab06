"""Helpers shared by every kernel folder."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.quantize import QuantizedRows, dequantize

INVALID_INDEX = -1  # a top-k slot with no valid key behind it (context shorter than k, padding)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pads `axis` of x up to a multiple of `multiple`."""
    n = x.shape[axis]
    extra = cdiv(n, multiple) * multiple - n
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_q_block(q_block: int) -> None:
    if isinstance(q_block, bool) or not isinstance(q_block, numbers.Integral) or q_block <= 0:
        raise ValueError(f"q_block must be a positive int, got {q_block!r}")


# The pure-JAX reference paths (CPU, and the fallback elsewhere) cut the queries into blocks to bound memory.
# While a block's largest intermediate stays under this many elements (16 MB in float32) they take more
# queries per block, up to all of them: below that bound a loop step per q_block queries only costs time
# (lax.map runs its body's ops one after the other; the CPU training benchmark's step: 1.04x).
REFERENCE_BLOCK_ELEMENTS = 1 << 22


def reference_q_block(q_block: int, T: int, per_query: int) -> int:
    """The reference paths' query block: q_block, or more queries (at most T) while a block's largest
    intermediate, per_query elements per query, stays under REFERENCE_BLOCK_ELEMENTS."""
    check_q_block(q_block)
    return max(q_block, min(T, REFERENCE_BLOCK_ELEMENTS // max(per_query, 1)))


def to_query_blocks(x: jax.Array, bq: int, value=0) -> jax.Array:
    """[B, T, ...] -> [nb, B, bq, ...]: axis 1 cut into blocks of bq, the last padded with `value`."""
    x = pad_axis(x, 1, bq, value)
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // bq, bq, *x.shape[2:]), 1, 0)


def from_query_blocks(y: jax.Array, T: int) -> jax.Array:
    """[nb, B, bq, ...] -> [B, T, ...] (the padding of the last block sliced off)."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :T]


def map_query_blocks(fn, q_block: int, *arrays: jax.Array, pad_values=None, remat: bool = False):
    """Applies fn to consecutive blocks of axis 1 (the query axis) of each array, one block at a time
    (lax.map keeps only one block's intermediates live), and concatenates the outputs along axis 1.

    Blocks are min(q_block, T) long; the last is padded with pad_values (one per array, default 0) and the
    padded outputs are sliced off.

    remat: differentiate fn as a checkpoint. Without it, the map's linearisation saves every block's
    residuals (gathered rows, logits) stacked over all blocks until the backward pass: the whole [T, K, D]
    gather the blocking exists to avoid (16 GiB per chip for GLM-5.2's indexer at 32K queries). With it the
    backward pass recomputes one block at a time from the block's inputs."""
    check_q_block(q_block)
    T = arrays[0].shape[1]
    bq = min(q_block, T)
    pad_values = (0,) * len(arrays) if pad_values is None else pad_values
    blocked = [to_query_blocks(a, bq, v) for a, v in zip(arrays, pad_values, strict=True)]
    body = jax.checkpoint(fn) if remat else fn
    out = jax.lax.map(lambda xs: body(*xs), tuple(blocked))
    return jax.tree.map(lambda y: from_query_blocks(y, T), out)


PALLAS_IMPLS = ("pallas", "pallas_tpu", "pallas_gpu")


def kernel_family(impl: str, interpret: bool) -> str:
    """The kernel family ("tpu" | "gpu") a Pallas impl runs; nothing is inferred from the host beyond this.

    "pallas": the family of `jax.default_backend()`. On a CPU backend there is none, so it needs
    interpret=True and then means the TPU kernels interpreted. "pallas_tpu" / "pallas_gpu" force a family;
    with interpret=False they lower the real Mosaic / Triton kernels whatever the host backend is (how a
    program is compiled ahead of time for a TPU from a CPU host)."""
    if impl == "pallas":
        backend = jax.default_backend()
        if backend in ("tpu", "gpu"):
            return backend
        if interpret:
            return "tpu"
        raise ValueError(f"impl='pallas' on the {backend!r} backend: there are no {backend} kernels; set "
                         "interpret=True to run the TPU kernels in interpret mode on CPU, or force a family with "
                         "impl='pallas_tpu' / 'pallas_gpu'")
    if impl in ("pallas_tpu", "pallas_gpu"):
        return impl.removeprefix("pallas_")
    raise ValueError(f"unknown kernel impl {impl!r}; expected 'reference' or one of {PALLAS_IMPLS}")


def selected_mask(indices: jax.Array, S: int) -> jax.Array:
    """indices [B, T, K] int (distinct per query; negative: empty) -> [B, T, S] bool, True at the selected rows.

    One scatter of B*T*K writes; comparing every index against every row ([B, T, K, S]) costs S times more:
    0.95 ms against 0.11 ms on this CPU for [4, 128, 64] indices over S = 256."""
    B, T, _ = indices.shape
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None]
    t = jnp.arange(T, dtype=jnp.int32)[None, :, None]
    cols = jnp.where(indices >= 0, indices, S)  # empty slots: out of range, dropped
    return jnp.zeros((B, T, S), bool).at[b, t, cols].set(True, mode="drop")


def gather_rows(x, indices: jax.Array, dtype=None) -> jax.Array:
    """x [B, S, ...], indices [B, T, K] -> [B, T, K, ...] rows x[b, indices[b, t, k]]; a negative (empty) index
    reads row 0, which the caller masks. x [1, S, ...] is one pool of rows shared by every batch row (a paged
    cache: indices are pool rows). x may be QuantizedRows: only the selected rows are read (a folded tail's
    rows i // n), and they are dequantized to `dtype`."""

    def gather(a, indices=indices):
        idx = jnp.clip(indices, 0, a.shape[1] - 1)
        if a.shape[0] == 1:
            return a[0][idx]
        return jax.vmap(lambda a_b, i_b: a_b[i_b])(a, idx)

    if isinstance(x, QuantizedRows):
        tail, n = x.tail, x.tail_fold
        if n > 1:  # a folded tail: row i // n, its (i % n)-th part
            d = tail.shape[-1] // n
            folded = gather(tail, jnp.maximum(indices, 0) // n)
            folded = folded.reshape(*folded.shape[:-1], n, d)
            part = (jnp.maximum(indices, 0) % n)[..., None, None]
            tail = jnp.take_along_axis(folded, part, axis=-2)[..., 0, :]
        else:
            tail = None if tail is None else gather(tail)
        return dequantize(QuantizedRows(gather(x.values), gather(x.scale), tail), dtype)
    return gather(x)


# Inside a shard_map with check_vma, every value's type says which manual mesh axes it varies over. A
# pallas_call cannot infer that for its outputs, and a loop carry must keep one type from init to body output,
# so both are stated from the inputs. Outside shard_map no axis varies and these change nothing.


def varying_axes(*xs) -> frozenset:
    """The manual mesh axes any of xs varies over."""
    return frozenset().union(*(jax.typeof(x).mat.varying for x in xs))


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """The ShapeDtypeStruct of a pallas_call output computed from `inputs`: it varies where they vary."""
    mat = jax.sharding.ManualAxisType(varying=varying_axes(*inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def match_varying(x: jax.Array, *inputs) -> jax.Array:
    """x cast to vary over every manual mesh axis the inputs vary over (a loop carry built from constants)."""
    axes = varying_axes(*inputs) - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x
