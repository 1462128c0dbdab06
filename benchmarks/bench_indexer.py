"""Indexer scores + top-k at GLM-5.2 shapes (32 heads x 128, top-k 2048): Pallas path vs reference, and the
exact threshold top-k vs lax.top_k and approx_max_k.

    python -m benchmarks.bench_indexer            # on a TPU / GPU: real shapes; on CPU: small, interpreted
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.harness import on_accelerator, report, start, time_fn
from pallas_kernels.dsa_indexer import indexer_topk, select_topk


def bench_prefill_block(S: int, q_block: int, H: int, D: int, K: int, impl: str, interpret: bool):
    """One query block at the end of an S-token context: what every prefill/training block costs at worst."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, q_block, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, S, D), jnp.bfloat16)
    w = jax.random.normal(ks[2], (1, q_block, H), jnp.float32)
    valid = jnp.ones((1, S), bool)
    qi = jnp.arange(S - q_block, S, dtype=jnp.int32)[None]

    def run(impl_):
        return jax.jit(lambda q, k, w: indexer_topk(q, k, w, key_valid=valid, query_index=qi, topk=K,
                                                    scale=D**-0.5, q_block=q_block, impl=impl_,
                                                    interpret=interpret))

    flops = 2 * q_block * H * D * S + 3 * q_block * H * S
    bytes_ = S * D * 2 + q_block * S * 4
    t_ref = time_fn(run("reference"), q, k, w)
    report(f"indexer reference  S={S:>7d} bq={q_block}", t_ref, flops, bytes_)
    t = time_fn(run(impl), q, k, w)
    report(f"indexer {impl:<10s} S={S:>7d} bq={q_block}", t, flops, bytes_, baseline=t_ref)


def bench_topk(rows: int, S: int, K: int, impl: str, interpret: bool):
    x = jax.random.normal(jax.random.key(1), (rows, S), jnp.float32)
    bytes_ = rows * S * 4
    t_sort = time_fn(jax.jit(lambda x: jax.lax.top_k(x, K)[1]), x)
    report(f"lax.top_k        [{rows},{S}] k={K}", t_sort, 0, bytes_)
    t_approx = time_fn(jax.jit(lambda x: jax.lax.approx_max_k(x, K, recall_target=1.0)[1]), x)
    report(f"approx_max_k(1.0) [{rows},{S}] k={K}", t_approx, 0, bytes_, baseline=t_sort, vs="lax.top_k")
    # The same threshold search the indexer path uses for this impl (the VMEM kernel on TPU).
    t_exact = time_fn(jax.jit(lambda x: select_topk(x, K, impl=impl, interpret=interpret)), x)
    report(f"exact top-k {impl:<10s} [{rows},{S}] k={K}", t_exact, 0, bytes_, baseline=t_sort, vs="lax.top_k")


def main(argv=None):
    impl, interpret = start(argv)
    if on_accelerator():
        for S in (8192, 65536, 131072):
            bench_prefill_block(S, 64, 32, 128, 2048, impl, interpret)
        bench_prefill_block(1048576, 8, 32, 128, 2048, impl, interpret)  # decode-like: few queries, 1M context
        for S in (8192, 131072):
            bench_topk(64, S, 2048, impl, interpret)
    else:
        bench_prefill_block(512, 16, 4, 32, 64, impl, interpret)
        bench_topk(16, 4096, 256, impl, interpret)


if __name__ == "__main__":
    main()
