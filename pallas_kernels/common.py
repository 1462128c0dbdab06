"""Helpers shared by every kernel folder."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

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


def map_query_blocks(fn, q_block: int, *arrays: jax.Array):
    """Applies fn to consecutive blocks of axis 1 (the query axis) of each array, one block at a time
    (lax.map keeps only one block's intermediates live), and concatenates the outputs along axis 1."""
    T = arrays[0].shape[1]
    bq = min(q_block, T)
    nb = cdiv(T, bq)
    blocked = [
        jnp.moveaxis(pad_axis(a, 1, bq).reshape(a.shape[0], nb, bq, *a.shape[2:]), 1, 0) for a in arrays
    ]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(blocked))

    def unblock(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], nb * bq, *y.shape[3:])[:, :T]

    return jax.tree.map(unblock, out)


PALLAS_IMPLS = ("pallas", "pallas_tpu", "pallas_gpu")


def kernel_family(impl: str) -> tuple[str, bool]:
    """impl -> (kernel family "tpu" | "gpu", interpret?).

    "pallas" picks the kernels of the default backend; on CPU (tests) it runs the TPU kernels in interpret
    mode. "pallas_tpu" / "pallas_gpu" force a family, interpreted when the backend is not that chip."""
    backend = jax.default_backend()
    if impl == "pallas":
        if backend in ("tpu", "gpu"):
            return backend, False
        return "tpu", True
    if impl in ("pallas_tpu", "pallas_gpu"):
        family = impl.removeprefix("pallas_")
        return family, backend != family
    raise ValueError(f"unknown kernel impl {impl!r}; expected 'reference' or one of {PALLAS_IMPLS}")


@functools.cache
def _tuned_table() -> dict:
    return json.loads((Path(__file__).parent / "tuned_blocks.json").read_text())


def tuned_blocks(op: str, family: str) -> dict:
    """Block-size keyword arguments for `op` on the current chip (tuned_blocks.json): the entry for the exact
    device kind if there is one, else the family's."""
    table = _tuned_table()[op]
    kind = jax.devices()[0].device_kind
    return dict(table.get(kind, table[family]))
