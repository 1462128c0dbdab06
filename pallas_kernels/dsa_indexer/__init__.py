"""DSA lightning indexer: scores and exact top-k.

`indexer_topk(..., impl)`: "reference" (pure JAX, `lax.top_k`), or a Pallas impl: per query block, the
scores kernel of the chip (tpu.py / gpu.py) followed by the exact threshold top-k (topk.py; on TPU its
32-pass threshold search is a kernel holding each row in VMEM).
"""

from __future__ import annotations

import functools

from pallas_kernels.common import kernel_family, map_query_blocks, tuned_blocks
from pallas_kernels.dsa_indexer.reference import indexer_topk_reference
from pallas_kernels.dsa_indexer.topk import exact_topk


def indexer_scores(q, k, w, key_valid, query_index, *, scale: float, k_scale=None, impl: str = "pallas"):
    """Scores [B,T,S] float32 (-inf where masked) with the Pallas kernel family that `impl` selects."""
    family, interpret = kernel_family(impl)
    if family == "tpu":
        from pallas_kernels.dsa_indexer.tpu import indexer_scores_tpu as kernel
    else:
        from pallas_kernels.dsa_indexer.gpu import indexer_scores_gpu as kernel
    return kernel(q, k, w, key_valid, query_index, scale=scale, k_scale=k_scale, interpret=interpret,
                  **tuned_blocks("indexer_scores", family))


def select_topk(scores, k: int, *, impl: str = "pallas"):
    """Exact top-k of scores [..., S] float32 (see topk.exact_topk) with the threshold search of `impl`:
    the TPU kernel (each row held in VMEM for the 32 passes) on the TPU family, XLA on GPU."""
    family, interpret = kernel_family(impl)
    threshold_fn = None
    if family == "tpu":
        from pallas_kernels.dsa_indexer.tpu import kth_largest_key_tpu

        threshold_fn = functools.partial(kth_largest_key_tpu, interpret=interpret,
                                         **tuned_blocks("kth_largest_key", family))
    return exact_topk(scores, k, threshold_fn=threshold_fn)


def indexer_topk(q, k, w, *, key_valid, query_index, topk: int, scale: float, q_block: int = 128,
                 impl: str = "reference", k_scale=None):
    """Top-k key indices [B, T, min(topk, S)] int32 per query, -1 in empty slots.

    q [B,T,H,D], k [B,S,D], w [B,T,H] float32, key_valid [B,S] bool, query_index [B,T] int32 (see
    `indexer_topk_reference`). The reference returns indices best first; the Pallas path returns them in
    increasing key order (same set)."""
    if impl == "reference":
        if k_scale is not None:
            raise ValueError("indexer_topk: quantized keys (k_scale) need a Pallas impl")
        return indexer_topk_reference(q, k, w, key_valid=key_valid, query_index=query_index, topk=topk,
                                      scale=scale, q_block=q_block)
    kernel_family(impl)  # an unknown impl fails here, before tracing

    def block(qb, wb, qib):
        scores = indexer_scores(qb, k, wb, key_valid, qib, scale=scale, k_scale=k_scale, impl=impl)
        return select_topk(scores, topk, impl=impl)

    return map_query_blocks(block, q_block, q, w, query_index)
