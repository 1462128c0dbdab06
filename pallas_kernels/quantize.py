"""Quantized KV-cache rows: per-row symmetric scales, FP8 (e4m3) or int8 values.

A serving cache stores, per token, MLA's latent row (the 512 normed kv-latent values, then the 64 roped
shared-key values) and, on full layers, the indexer key (128 values). Quantized, a row keeps its values in
8 bits and one float32 scale: value ~= q * scale with scale = amax(|row|) / QMAX, so the row's largest value
is exactly representable and every value keeps e4m3's 3-bit mantissa (a relative error of at most 2^-4) or
int8's 1/254 of the row's range. The rope dims of a latent row stay unquantized (the `tail`): the positional
part of every attention logit comes from them, and they are only 64 values (DeepSeek's FP8 MLA cache keeps
them in bf16 for the same reason).

`QuantizedRows` is a pytree (a NamedTuple of arrays), so caches, shardings and jit treat it like an array
tuple. The kernels take it where they take `kv` or indexer keys: the gather of the selected rows
dequantizes them (`common.gather_rows`), and the indexer kernels take `values, scale` as `k, k_scale`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
QMAX = {jnp.dtype(FP8): 448.0, jnp.dtype(jnp.int8): 127.0}


class QuantizedRows(NamedTuple):
    """Rows [..., S, D + Dt] stored as values [..., S, D] (float8_e4m3fn or int8), scale [..., S] float32 and
    tail [..., S, Dt] unquantized (None when every dim is quantized). Row s = concat(values[s] * scale[s],
    tail[s]).

    Packed values are the TPU layouts, four 8-bit values per uint32 word: an 8-bit array gets 8-bit tiles
    there, and writing one row into them makes XLA copy the whole buffer on every step (a [131072, 512] fp8
    buffer: 66 MiB of temporaries per 4-row write, against 1 MiB for the same bytes as uint32 [131072, 128];
    v5p, compiled ahead of time). Two packings:
    - along the row (`packed`): float8_e4m3fn values as uint32 [..., S, D / 4] (latent rows, which the
      kernels gather one row at a time);
    - along the sequence (`sequence_packed`): int8 values as uint32 [..., S / 4, D], word [a, d] holding
      values[4a + j, d] in byte j (`pack_sequence`; the indexer keys, which the TPU scores kernel reads in
      blocks of rows: Mosaic's `pltpu.bitcast` unpacks a word tile into the int8 tile without moving a byte,
      and a 128-value key row stays lane-dense).
    The tail may be folded (`tail_fold` n > 1): [..., S / n, n * Dt], n consecutive positions' tails per row
    (`fold_rows`), so that GLM-5.2's 64 rope values fill 128 lanes two positions at a time instead of
    being padded to 128 (the TPU layout's latent rows: 644 bytes per token instead of 772)."""

    values: jax.Array
    scale: jax.Array
    tail: jax.Array | None = None

    @property
    def sequence_packed(self) -> bool:
        return self.values.dtype == jnp.uint32 and self.values.shape[-2] != self.scale.shape[-1]

    @property
    def packed(self) -> bool:
        return self.values.dtype == jnp.uint32 and not self.sequence_packed

    @property
    def tail_fold(self) -> int:
        """Positions per stored tail row (1: one row per position)."""
        if self.tail is None or self.tail.shape[-2] == self.scale.shape[-1]:
            return 1
        return self.scale.shape[-1] // self.tail.shape[-2]

    @property
    def quantized_dims(self) -> int:
        return self.values.shape[-1] * (4 if self.packed else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        extra = 0 if self.tail is None else self.tail.shape[-1] // self.tail_fold
        return (*self.scale.shape, self.quantized_dims + extra)

    @property
    def ndim(self) -> int:
        return self.values.ndim


def quantize(x: jax.Array, dtype=FP8) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (values [..., D] in dtype (float8_e4m3fn or int8), scale [...] float32), symmetric per row:
    scale = amax / QMAX (1 for an all-zero row), values = x / scale (rounded to the nearest for int8)."""
    dtype = jnp.dtype(dtype)
    if dtype not in QMAX:
        raise ValueError(f"quantize: dtype must be float8_e4m3fn or int8, got {dtype}")
    qmax = QMAX[dtype]
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
    y = jnp.clip(xf / scale[..., None], -qmax, qmax)
    if dtype == jnp.int8:
        y = jnp.round(y)
    return y.astype(dtype), scale


def quantize_rows(x: jax.Array, quantized_dims: int, dtype=FP8, tail_dtype=None) -> QuantizedRows:
    """x [..., D] -> QuantizedRows: the first quantized_dims dims quantized per row, the rest kept as the tail
    (in tail_dtype, default x's; None when quantized_dims == D). dtype uint32: float8_e4m3fn values packed
    four to a word along the row (sequence packing is the writer's: glmjax.serve.kv_cache)."""
    packed = jnp.dtype(dtype) == jnp.uint32
    values, scale = quantize(x[..., :quantized_dims], FP8 if packed else dtype)
    if packed:
        values = jax.lax.bitcast_convert_type(values.reshape(*values.shape[:-1], quantized_dims // 4, 4), jnp.uint32)
    tail = None
    if quantized_dims < x.shape[-1]:
        tail = x[..., quantized_dims:].astype(tail_dtype or x.dtype)
    return QuantizedRows(values, scale, tail)


def pack_sequence(values: jax.Array) -> jax.Array:
    """int8 [..., S, D] (S a multiple of 4) -> uint32 [..., S / 4, D]: word [a, d] holds values[4a + j, d] in
    byte j (little-endian: what `pltpu.bitcast(words, jnp.int8)` unpacks on TPU)."""
    *lead, S, D = values.shape
    grouped = jnp.swapaxes(values.reshape(*lead, S // 4, 4, D), -1, -2)  # [..., S/4, D, 4]
    return jax.lax.bitcast_convert_type(grouped, jnp.uint32)


def unpack_sequence(words: jax.Array, dtype=jnp.int8) -> jax.Array:
    """pack_sequence's inverse: uint32 [..., S / 4, D] -> dtype (8-bit) [..., S, D]."""
    *lead, W, D = words.shape
    return jnp.swapaxes(jax.lax.bitcast_convert_type(words, dtype), -1, -2).reshape(*lead, 4 * W, D)


def fold_rows(x: jax.Array, n: int) -> jax.Array:
    """[..., S, D] (S a multiple of n) -> [..., S / n, n * D]: row a holds positions n a .. n a + n - 1."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // n, n * x.shape[-1])


def unfold_rows(x: jax.Array, n: int) -> jax.Array:
    """fold_rows's inverse: [..., S / n, n * D] -> [..., S, D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * n, x.shape[-1] // n)


def dequantize(rows: QuantizedRows, dtype) -> jax.Array:
    """QuantizedRows -> the rows [..., D + Dt] in dtype (a folded tail unfolded; the rows' leading dims must
    be whole: use take_rows or gather_rows to select rows first)."""
    if rows.tail_fold > 1:
        rows = rows._replace(tail=unfold_rows(rows.tail, rows.tail_fold))
    values = rows.values
    if rows.sequence_packed:
        values = unpack_sequence(values)
    elif rows.packed:
        values = jax.lax.bitcast_convert_type(values, FP8).reshape(*values.shape[:-1], rows.quantized_dims)
    x = (values.astype(jnp.float32) * rows.scale[..., None]).astype(dtype)
    return x if rows.tail is None else jnp.concatenate([x, rows.tail.astype(dtype)], axis=-1)


def take_rows(x, index) -> jax.Array | QuantizedRows:
    """x[index] for an array, or for every part of QuantizedRows (index selects leading dims only)."""
    return jax.tree.map(lambda a: a[index], x)
