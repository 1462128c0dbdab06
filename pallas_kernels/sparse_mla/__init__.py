"""Sparse MLA attention (absorbed form) over top-k selected latent rows. `sparse_mla` dispatches on `impl`."""

from __future__ import annotations

from pallas_kernels.sparse_mla.reference import sparse_mla_reference

IMPLS = ("reference",)


def sparse_mla(q, kv, indices, *, scale: float, v_dim: int, q_block: int = 128, impl: str = "reference"):
    """See `sparse_mla_reference` for shapes and semantics."""
    if impl == "reference":
        return sparse_mla_reference(q, kv, indices, scale=scale, v_dim=v_dim, q_block=q_block)
    raise ValueError(f"sparse_mla: impl {impl!r} is not one of {IMPLS}")
