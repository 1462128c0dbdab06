"""Grouped matmul: rows sorted by group, each group's rows times its own matrix (the MoE expert compute).

`grouped_matmul(lhs [M,K], rhs [G,K,N], group_sizes [G]) -> [M,N]`, rows past sum(group_sizes) give 0.
Implementations (GMM_IMPLS), all differentiable in lhs and rhs:
- "megablox": jax's Pallas TPU kernel (`tpu.py`); on another backend it needs interpret=True, except when
  compiling ahead of time for TPU from a CPU host, which is why it can be chosen explicitly.
- "ragged_dot": XLA's `lax.ragged_dot` (`gpu.py`): a grouped GEMM on GPU. On CPU XLA lowers it densely
  (every row times every group): correct, but G times the work.
- "tiled": a loop over row tiles computing only routed rows (`cpu.py`), for CPU.
`impl=None` picks by `jax.default_backend()`: tpu -> megablox, gpu -> ragged_dot, cpu -> tiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.cpu import gmm_tiled, varying_like
from pallas_kernels.grouped_matmul.gpu import gmm_ragged_dot
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tpu import gmm_megablox

GMM_IMPLS: tuple[str, ...] = ("megablox", "ragged_dot", "tiled")
_BY_BACKEND = {"tpu": "megablox", "gpu": "ragged_dot", "cpu": "tiled"}
# Rows per tile of the CPU loop: smaller tiles waste fewer padded rows at group boundaries (at most
# G * (tm - 1)), larger ones pay the loop's per-iteration cost less often. 64 measured best for the
# benchmark's MoE (docs/moe.md) in prefill. With few rows per group (decode: 4 tokens x top-8 over 32
# experts) nearly every visit is one group's row or two in a 64-row tile, so the tile shrinks to the rows a
# group has on average, down to 8: a decode step's MoE took 13.8 ms per layer at 64 and 1.1 ms at 8.
CPU_TILE = 64
CPU_MIN_TILE = 8
# Rows per step of the CPU loop: each step runs cpu_visits_per_step tiles as one batched product. A while
# loop's body runs its ops one after the other, so a 64-row product per step leaves the matmul small (about
# 70 GFLOP/s on this CPU against 170+ for large ones); four tiles per step made the benchmark's MoE grouped
# matmuls (forward and backward) about 1.5x faster, the whole CPU training step 1.12-1.15x (docs/moe.md).
CPU_STEP_ROWS = 256


def cpu_tile(rows: int, groups: int) -> int:
    """The CPU loop's tile for `rows` rows over `groups` groups: the average rows per group rounded up to a
    power of two, within [CPU_MIN_TILE, CPU_TILE]."""
    per_group = max(1, -(-rows // max(groups, 1)))
    return min(CPU_TILE, max(CPU_MIN_TILE, 1 << (per_group - 1).bit_length()))


def cpu_visits_per_step(rows: int, groups: int, tile: int) -> int:
    """Tiles per step of the CPU loop: CPU_STEP_ROWS rows, at most the number of visits the plan can have.

    One tile per step when the tile has shrunk below CPU_TILE (few rows per group, as in decode): a step's
    cost is then reading its group's matrix, and a batched step gathers (copies) one matrix per tile. With 8
    tiles of 8 rows per step the benchmark's plain decode ran at a quarter of its speed."""
    if tile < CPU_TILE:
        return 1
    return max(1, min(CPU_STEP_ROWS // tile, -(-rows // tile) + groups - 1))


def default_impl() -> str:
    backend = jax.default_backend()
    if backend not in _BY_BACKEND:
        raise ValueError(f"grouped_matmul: no implementation for backend {backend!r}; pass impl= one of {GMM_IMPLS}")
    return _BY_BACKEND[backend]


def check_impl(impl: str | None, interpret: bool = False) -> str:
    """Resolves None to the backend's implementation; refuses unknown impls and misplaced interpret."""
    impl = default_impl() if impl is None else impl
    if impl not in GMM_IMPLS:
        raise ValueError(f"grouped_matmul: impl {impl!r} is not one of {GMM_IMPLS}")
    if interpret and impl != "megablox":
        raise ValueError(f"grouped_matmul: interpret=True applies to the Pallas impl 'megablox' only, not {impl!r}")
    return impl


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str | None = None,
                   transpose_rhs: bool = False, interpret: bool = False,
                   preferred_element_type=jnp.float32, tile: int | None = None) -> jax.Array:
    """lhs [M,K], rhs [G,K,N] ([G,N,K] with transpose_rhs), group_sizes [G] int32 with sum <= M -> [M,N].

    Products accumulate in float32; the result has preferred_element_type. `tile` is the CPU loop's rows per
    tile (None: `cpu_tile(M, G)`)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul: want lhs [M,K], rhs [G,K,N], group_sizes [G]; got {lhs.shape}, "
                         f"{rhs.shape}, {group_sizes.shape}")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        raise ValueError(f"grouped_matmul: contraction mismatch, lhs {lhs.shape} vs rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs})")
    impl = check_impl(impl, interpret)
    group_sizes = group_sizes.astype(jnp.int32)
    # Inside shard_map, give all operands the same varying mesh axes before the custom_vjps: the implicit
    # broadcast then happens here, where autodiff turns it into the psum of the weight gradient.
    lhs, rhs, group_sizes = (varying_like(a, lhs, rhs, group_sizes) for a in (lhs, rhs, group_sizes))
    if impl == "tiled":
        tile = cpu_tile(lhs.shape[0], rhs.shape[0]) if tile is None else int(tile)
        pv = cpu_visits_per_step(lhs.shape[0], rhs.shape[0], tile)
        return gmm_tiled(lhs, rhs, group_sizes, tile, bool(transpose_rhs), jnp.dtype(preferred_element_type), pv)
    if impl == "ragged_dot":
        return gmm_ragged_dot(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=preferred_element_type)
    return gmm_megablox(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=preferred_element_type,
                        interpret=interpret)


__all__ = ["CPU_TILE", "GMM_IMPLS", "check_impl", "default_impl", "grouped_matmul", "grouped_matmul_reference"]
