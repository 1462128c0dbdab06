"""DSA lightning indexer: scores and exact top-k. `indexer_topk` dispatches on `impl`."""

from __future__ import annotations

from pallas_kernels.dsa_indexer.reference import indexer_topk_reference

IMPLS = ("reference",)


def indexer_topk(q, k, w, *, key_valid, query_index, topk: int, scale: float, q_block: int = 128,
                 impl: str = "reference"):
    """See `indexer_topk_reference` for shapes and semantics."""
    if impl == "reference":
        return indexer_topk_reference(q, k, w, key_valid=key_valid, query_index=query_index, topk=topk,
                                      scale=scale, q_block=q_block)
    raise ValueError(f"indexer_topk: impl {impl!r} is not one of {IMPLS}")
