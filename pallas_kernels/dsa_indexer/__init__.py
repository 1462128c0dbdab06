"""DSA lightning indexer: scores, exact top-k, and the indexer-loss terms.

`indexer_topk(..., impl, interpret)`: "reference" (pure JAX, `lax.top_k`), or a Pallas impl: per query block,
the scores kernel of the family (tpu.py / gpu.py) followed by the exact threshold top-k (topk.py; on TPU its
32-pass threshold search is a kernel holding each row in VMEM). Both walk the queries in blocks of q_block.
`indexer_scores_at` (loss_terms.py) gives the differentiable scores of the selected keys, for the indexer loss.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels.blocks import tuned_blocks
from pallas_kernels.common import check_q_block, kernel_family, map_query_blocks
from pallas_kernels.dsa_indexer.loss_terms import indexer_scores_at
from pallas_kernels.dsa_indexer.reference import indexer_scores_block, indexer_topk_reference, reference_block
from pallas_kernels.dsa_indexer.topk import exact_topk, sharded_topk
from pallas_kernels.quantize import QuantizedRows, dequantize

__all__ = ["indexer_scores", "indexer_scores_at", "indexer_topk", "select_topk"]


def _scores(family: str, interpret: bool, q, k, w, key_valid, query_index, query_start, scale, k_scale,
            pages=None):
    extra = {}
    if family == "tpu":
        from pallas_kernels.dsa_indexer.tpu import indexer_scores_tpu as kernel

        extra = dict(pages=pages)
    else:
        from pallas_kernels.dsa_indexer.gpu import indexer_scores_gpu as kernel
    return kernel(q, k, w, key_valid, query_index, scale=scale, query_start=query_start, k_scale=k_scale,
                  blocks=tuned_blocks("indexer_scores", family), interpret=interpret, **extra)


def _dequantized(k, k_scale):
    """The reference's keys: quantized keys (int8, fp8, or int8 packed along the sequence in uint32) times
    their per-token scales (float32), else k as it is."""
    if k_scale is None:
        return k
    return dequantize(QuantizedRows(k, k_scale), jnp.float32)


def _select(family: str, interpret: bool, scores, k: int, key_shards: tuple[str, ...] = ()):
    if key_shards:  # the 32 counting passes need an all-reduce each: XLA's loop, not the VMEM kernel
        return sharded_topk(scores, k, key_shards)
    threshold_fn = None
    if family == "tpu":
        from pallas_kernels.dsa_indexer.tpu import kth_largest_key_tpu

        threshold_fn = functools.partial(kth_largest_key_tpu, interpret=interpret,
                                         blocks=tuned_blocks("kth_largest_key", family))
    return exact_topk(scores, k, threshold_fn=threshold_fn)


def indexer_scores(q, k, w, *, key_valid, query_index, scale: float, impl: str = "reference",
                   interpret: bool = False, query_start=None, k_scale=None):
    """Scores [B,T,S] float32 (-inf where masked) of one query block, not chunked (see indexer_topk for that).

    q [B,T,H,D], k [B,S,D] (int8 on TPU / float8_e4m3fn on GPU with k_scale [B,S] f32; on TPU int8 packed
    along the sequence, uint32 [B,S/4,D]: quantize.pack_sequence), w [B,T,H] f32,
    key_valid [B,S] bool, query_index [B,T] int32, query_start [B,T] int32 or None (see
    `indexer_topk_reference`). impl: "reference" or a Pallas impl (see common.kernel_family)."""
    if impl == "reference":
        return indexer_scores_block(q, _dequantized(k, k_scale), w, key_valid, query_index, scale, query_start)
    return _scores(kernel_family(impl, interpret), interpret, q, k, w, key_valid, query_index, query_start,
                   scale, k_scale)


def select_topk(scores, k: int, *, impl: str, interpret: bool = False):
    """Exact top-k of scores [..., S] float32 (see topk.exact_topk) with the threshold search of a Pallas impl:
    the TPU kernel (each row held in VMEM for the 32 passes) on the TPU family, XLA on GPU."""
    return _select(kernel_family(impl, interpret), interpret, scores, k)


def indexer_topk(q, k, w, *, key_valid, query_index, topk: int, scale: float, q_block: int,
                 impl: str = "reference", interpret: bool = False, query_start=None, reduce_scores=None,
                 k_scale=None, key_shards: tuple[str, ...] = (), pages=None):
    """Top-k key indices [B, T, min(topk, S)] int32 per query, -1 in empty slots.

    q [B,T,H,D], k [B,S,D], w [B,T,H] float32, key_valid [B,S] bool, query_index [B,T] int32, query_start
    [B,T] int32 or None (keys s < query_start are masked: packed documents); see `indexer_topk_reference`.
    Queries are walked in blocks of q_block (lax.map) by every impl. reduce_scores, if given, maps each
    block's scores [B,bq,S] float32 before the top-k: `lambda s: jax.lax.psum(s, "tensor")` when the heads
    are split over devices (masked entries are -inf on every device, and stay -inf). k_scale: quantized keys
    (every impl; the reference dequantizes them first). The reference returns indices best first; the Pallas
    path returns them in increasing key order (same set). interpret is ignored by the reference.

    key_shards: mesh axes the keys are split over (inside shard_map; a sequence-sharded KV cache): k and
    key_valid are this shard's consecutive keys, query_index and query_start are given relative to its first
    key, and the result is this shard's part of the global top-k in local indices (topk.sharded_topk, for
    every impl).

    pages [B, M] int32 (Pallas TPU only): k and k_scale are a pool [1, N, ...] of pages, key s of row b at pool
    row pages[b, s // page] * page + s % page (page = S / M, a multiple of 128; S from key_valid); the kernel
    reads them through the tables. Other impls take keys in logical order (gather them first)."""
    check_q_block(q_block)
    if pages is not None and (impl == "reference" or kernel_family(impl, interpret) != "tpu"):
        raise ValueError(f"indexer_topk: page tables are read by the Pallas TPU kernel only, not impl {impl!r}")
    if impl == "reference":
        k = _dequantized(k, k_scale)
    if key_shards and impl == "reference":

        def ref_block(qb, wb, qib, qsb):
            scores = indexer_scores_block(qb, k, wb, key_valid, qib, scale, qsb)
            return sharded_topk(scores if reduce_scores is None else reduce_scores(scores), topk, key_shards)

        qs = jnp.zeros_like(query_index) if query_start is None else query_start
        return map_query_blocks(ref_block, reference_block(q, k, q_block), q, w, query_index, qs)
    if impl == "reference":
        return indexer_topk_reference(q, k, w, key_valid=key_valid, query_index=query_index, topk=topk,
                                      scale=scale, q_block=q_block, query_start=query_start,
                                      reduce_scores=reduce_scores)
    family = kernel_family(impl, interpret)  # an unknown impl fails here, before tracing
    qs = jnp.zeros_like(query_index) if query_start is None else query_start

    def block(qb, wb, qib, qsb):
        scores = _scores(family, interpret, qb, k, wb, key_valid, qib, qsb, scale, k_scale, pages)
        if reduce_scores is not None:
            scores = reduce_scores(scores)
        return _select(family, interpret, scores, topk, key_shards)

    return map_query_blocks(block, q_block, q, w, query_index, qs)
