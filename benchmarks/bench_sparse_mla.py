"""Sparse MLA attention (absorbed, 64 heads x 576, top-k 2048) forward and backward: Pallas vs reference.

    python -m benchmarks.bench_sparse_mla         # on a TPU / GPU: real shapes; on CPU: small, interpreted
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.harness import on_accelerator, report, start, time_fn
from pallas_kernels.sparse_mla import sparse_mla


def inputs(B, T, S, H, Dk, K):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, Dk), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (B, S, Dk), jnp.bfloat16)
    # Each query's K distinct rows from its causal past (queries sit at the end of the context).
    scores = jax.random.uniform(ks[2], (B, T, S))
    pos = jnp.arange(S - T, S)[None, :, None]
    scores = jnp.where(jnp.arange(S)[None, None, :] <= pos, scores, -1.0)
    idx = jax.lax.top_k(scores, K)[1].astype(jnp.int32)
    return q, kv, idx


def bench(B, T, S, H, Dk, v_dim, K, impl, interpret):
    q, kv, idx = inputs(B, T, S, H, Dk, K)
    scale = 256**-0.5
    flops_fwd = 2 * B * T * H * K * (Dk + v_dim)
    bytes_fwd = B * T * K * Dk * 2 + B * T * H * (Dk + v_dim) * 2

    def fwd(impl_):
        return jax.jit(lambda q, kv: sparse_mla(q, kv, idx, scale=scale, v_dim=v_dim, q_block=64, impl=impl_,
                                                      interpret=interpret)[0])

    def grad(impl_):
        f = lambda q, kv: jnp.sum(sparse_mla(q, kv, idx, scale=scale, v_dim=v_dim, q_block=64, impl=impl_,
                                             interpret=interpret)[0].astype(jnp.float32))
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    tag = f"B={B} T={T} S={S}"
    t_ref = time_fn(fwd("reference"), q, kv)
    report(f"sparse_mla fwd reference {tag}", t_ref, flops_fwd, bytes_fwd)
    report(f"sparse_mla fwd {impl} {tag}", time_fn(fwd(impl), q, kv), flops_fwd, bytes_fwd, baseline=t_ref)
    t_ref = time_fn(grad("reference"), q, kv)
    report(f"sparse_mla fwd+bwd reference {tag}", t_ref, 3.5 * flops_fwd, 3 * bytes_fwd)
    report(f"sparse_mla fwd+bwd {impl} {tag}", time_fn(grad(impl), q, kv), 3.5 * flops_fwd, 3 * bytes_fwd,
           baseline=t_ref)


def main(argv=None):
    impl, interpret = start(argv)
    if on_accelerator():
        for S in (8192, 65536, 131072):
            bench(1, 512, S, 64, 576, 512, 2048, impl, interpret)  # a prefill/training slice of 512 queries
        bench(8, 1, 1048576 // 8, 64, 576, 512, 2048, impl, interpret)  # decode: batch 8, 128K each
    else:
        bench(1, 16, 256, 4, 576, 512, 32, impl, interpret)


if __name__ == "__main__":
    main()
