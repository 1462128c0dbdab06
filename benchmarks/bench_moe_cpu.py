"""The CPU MoE's two expert paths side by side: the routed tile loop (rows sorted by expert, three grouped
matmuls that compute only the routed rows) against every expert on every token (`moe._dense_ffn`, the path
taken up to `moe.DENSE_ROWS_PER_EXPERT` routed rows per expert on average), from routed tokens to the k
chosen outputs per token.

    .venv/bin/python -m benchmarks.bench_moe_cpu [--tokens 1,4,16,64,128]

Shapes: the demo model's experts (8 of 128 x 64, top-2), the generation benchmark's (32 of 512 x 256, top-8)
and one between; uniform random routing, float32.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import time_fn
from glmjax.model import moe

SHAPES = {"demo (E8 k2, 128x64)": (8, 2, 128, 64), "E16 k4, 256x128": (16, 4, 256, 128),
          "bench_generate (E32 k8, 512x256)": (32, 8, 512, 256)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,4,16,64,128")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"CPU MoE experts, float32, {jax.devices()[0].device_kind}: the routed loop vs every expert on every token")
    for name, (E, k, D, I) in SHAPES.items():
        plan = moe._Plan(E, jnp.float32, "tiled", False)
        rng = np.random.default_rng(0)
        wg, wu = (jnp.asarray(rng.normal(size=(E, D, I)).astype(np.float32) * 0.05) for _ in range(2))
        wd = jnp.asarray(rng.normal(size=(E, I, D)).astype(np.float32) * 0.05)
        loop = jax.jit(lambda x, e, *w, plan=plan: moe._dispatch(plan, x, e, jnp.ones(x.shape[:1], bool), *w))
        dense = jax.jit(lambda *a, plan=plan: moe._dense_ffn(plan, *a))
        for n in tokens:
            x = jnp.asarray(rng.normal(size=(n, D)).astype(np.float32))
            experts = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32))
            a = (x, experts, wg, wu, wd)
            err = float(jnp.max(jnp.abs(loop(*a) - dense(*a))))
            t_loop = time_fn(loop, *a, iters=args.iters)
            t_dense = time_fn(dense, *a, iters=args.iters)
            taken = "dense" if n * k <= moe.DENSE_ROWS_PER_EXPERT * E else "loop"
            print(f"  {name:<34s} {n:4d} tokens ({n * k / E:5.1f} rows/expert): loop {t_loop * 1e3:7.3f} ms  "
                  f"dense {t_dense * 1e3:7.3f} ms  x{t_loop / t_dense:.2f}  (max diff {err:.1e}; "
                  f"the MoE takes {taken})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
