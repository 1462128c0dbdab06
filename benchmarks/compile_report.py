"""Ahead-of-time TPU compiles of the DSA kernels at GLM-5.2 shapes, with each program's memory analysis.

    python -m benchmarks.compile_report                   # v5p and v6e, every shape (a few minutes on CPU)
    python -m benchmarks.compile_report --topology v5p:2x2x1 --only indexer

Runs on a CPU host with libtpu installed (the `test` extra). Shapes: 64 query heads x 576 latent dims,
32 x 128 indexer, top-k 2048; a prefill/training block of 64 queries at the end of an 8K and a 128K context
(forward and backward for attention), and decode (batch 8 against 128K each; batch 1 against 1M). The last
column compares temporaries with one dense [T, S] float32 score array per head, what dense attention over
the block's whole context would hold.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.tpu_aot import compile_for_tpu  # noqa: E402
from pallas_kernels.blocks import tuned_blocks  # noqa: E402
from pallas_kernels.dsa_indexer import indexer_topk  # noqa: E402
from pallas_kernels.sparse_mla.tpu import sparse_mla_bwd_tpu, sparse_mla_fwd_tpu  # noqa: E402

H, DK, V, HI, DI, K = 64, 576, 512, 32, 128, 2048
Q_BLOCK = 64  # queries per block of the attention programs (ModelOptions.q_block)
SHAPES = [  # name, batch, queries, context
    ("prefill 8K", 1, 64, 8192),
    ("prefill 128K", 1, 64, 131072),
    ("decode 8x128K", 8, 1, 131072),
    ("decode 1M", 1, 1, 1048576),
]
sd = jax.ShapeDtypeStruct


def indexer_program(B, T, S, int8):
    """The public indexer_topk with the real Mosaic kernels (impl="pallas_tpu", interpret=False), one query block."""
    def fn(q, k, w, valid, qi, ks):
        return indexer_topk(q, k, w, key_valid=valid, query_index=qi, topk=K, scale=DI**-0.5, q_block=T,
                            impl="pallas_tpu", interpret=False, k_scale=ks if int8 else None)

    args = (sd((B, T, HI, DI), jnp.bfloat16), sd((B, S, DI), jnp.int8 if int8 else jnp.bfloat16),
            sd((B, T, HI), jnp.float32), sd((B, S), jnp.bool_), sd((B, T), jnp.int32), sd((B, S), jnp.float32))
    return fn, args


def attention_program(B, T, S, backward, width=DK):
    q, kv, idx = sd((B, T, H, DK), jnp.bfloat16), sd((B, S, width), jnp.bfloat16), sd((B, T, K), jnp.int32)
    kw = dict(scale=256**-0.5, v_dim=V, q_block=Q_BLOCK)
    if not backward:
        fwd_blocks = tuned_blocks("sparse_mla_fwd", "tpu")
        return (lambda q, kv, idx: sparse_mla_fwd_tpu(q, kv, idx, blocks=fwd_blocks, **kw)), (q, kv, idx)
    out, lse = sd((B, T, H, V), jnp.bfloat16), sd((B, T, H), jnp.float32)
    bwd_blocks = tuned_blocks("sparse_mla_bwd", "tpu")

    def fn(q, kv, idx, out, lse, d_out):
        return sparse_mla_bwd_tpu(q, kv, idx, out, lse, d_out, blocks=bwd_blocks, **kw)

    return fn, (q, kv, idx, out, lse, out)


def report(label, topology, B, T, S, heads, program):
    fn, args = program
    m = compile_for_tpu(fn, *args, topology=topology).memory_analysis()
    dense = B * T * S * 4 * heads
    print(f"{topology:<10s} {label:<34s} temp {m.temp_size_in_bytes / 2**20:9.1f} MiB  args "
          f"{m.argument_size_in_bytes / 2**20:8.1f} MiB  out {m.output_size_in_bytes / 2**20:7.1f} MiB  "
          f"temp / dense [T,S]x{heads} = {m.temp_size_in_bytes / dense:.3f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", action="append", help="default: v5p:2x2x1 and v6e:2x2")
    ap.add_argument("--only", choices=["indexer", "attention"])
    args = ap.parse_args(argv)
    for topo in args.topology or ["v5p:2x2x1", "v6e:2x2"]:
        for name, B, T, S in SHAPES:
            if args.only in (None, "indexer"):
                report(f"indexer {name}", topo, B, T, S, HI, indexer_program(B, T, S, False))
                report(f"indexer int8 keys {name}", topo, B, T, S, HI, indexer_program(B, T, S, True))
            if args.only in (None, "attention"):
                decode = T == 1
                report(f"sparse_mla fwd {name}", topo, B, T, S, H,
                       attention_program(B, T, S, False, 640 if decode else DK))
                if not decode:
                    report(f"sparse_mla bwd {name}", topo, B, T, S, H, attention_program(B, T, S, True))


if __name__ == "__main__":
    main()
