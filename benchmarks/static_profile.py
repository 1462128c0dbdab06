"""Static cycle estimates for TPU v5p from libtpu's LLO profile: DSA kernels next to what they replace.

    python -m benchmarks.static_profile                 # all cases, one subprocess each (libtpu may abort
                                                        # the process after dumping; the dump is kept)

These are the compiler's static estimates for one v5p TensorCore, not hardware timings: leads to check on a
real chip. Each case compiles one program with `--xla_jf_dump_static_llo_profile_to` and sums the
`estimated_cycles` of every op in the dump.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    # name: (description, baseline name or None)
    "topk_lax": ("lax.top_k on [64, 131072], k=2048", None),
    "topk_approx": ("approx_max_k(recall 1.0) on [64, 131072], k=2048", "topk_lax"),
    "topk_exact": ("exact threshold top-k (TPU kernel + compaction) on [64, 131072]", "topk_lax"),
    "scores_xla": ("indexer scores, 64 queries x 131072 keys, XLA reference", None),
    "scores_kernel": ("indexer scores, 64 queries x 131072 keys, TPU kernel (causal skip)", "scores_xla"),
    "attn_dense": ("dense absorbed attention, 64 queries x 131072 keys x 64 heads (XLA)", None),
    "attn_sparse": ("sparse MLA fwd, 64 queries x 2048 selected rows x 64 heads (TPU)", "attn_dense"),
    "decode_dense": ("dense absorbed attention, decode 8 x 131072 keys (XLA)", None),
    "decode_sparse": ("sparse MLA fwd, decode 8 x 2048 selected rows (TPU)", "decode_dense"),
}


def program(name):
    import jax
    import jax.numpy as jnp

    from benchmarks.compile_report import attention_program
    from pallas_kernels.blocks import tuned_blocks
    from pallas_kernels.dsa_indexer.reference import indexer_scores_block
    from pallas_kernels.dsa_indexer.topk import exact_topk
    from pallas_kernels.dsa_indexer.tpu import indexer_scores_tpu, kth_largest_key_tpu

    sd = jax.ShapeDtypeStruct
    S, K = 131072, 2048
    bf = jnp.bfloat16
    if name.startswith("topk"):
        kth = functools.partial(kth_largest_key_tpu, blocks=tuned_blocks("kth_largest_key", "tpu"))
        fn = {"topk_lax": lambda x: jax.lax.top_k(x, K)[1],
              "topk_approx": lambda x: jax.lax.approx_max_k(x, K, recall_target=1.0)[1],
              "topk_exact": lambda x: exact_topk(x, K, threshold_fn=kth)}[name]
        return fn, (sd((64, S), jnp.float32),)
    if name.startswith("scores"):
        f = indexer_scores_block if name == "scores_xla" else (
            lambda q, k, w, v, qi, scale: indexer_scores_tpu(q, k, w, v, qi, scale=scale,
                                                             blocks=tuned_blocks("indexer_scores", "tpu")))
        args = (sd((1, 64, 32, 128), bf), sd((1, S, 128), bf), sd((1, 64, 32), jnp.float32), sd((1, S), jnp.bool_),
                sd((1, 64), jnp.int32))
        return (lambda q, k, w, v, qi: f(q, k, w, v, qi, 128**-0.5)), args

    def dense(q, kv):
        logits = jnp.einsum("bthd,bsd->bths", q, kv, preferred_element_type=jnp.float32)
        p = jax.nn.softmax(logits, axis=-1).astype(bf)
        return jnp.einsum("bths,bsv->bthv", p, kv[..., :512])

    B, T = (8, 1) if name.startswith("decode") else (1, 64)
    if name.endswith("dense"):
        return dense, (sd((B, T, 64, 576), bf), sd((B, S, 576), bf))
    return attention_program(B, T, S, backward=False, width=640 if B == 8 else 576)


def child(name: str) -> None:
    from benchmarks.tpu_aot import compile_for_tpu

    fn, args = program(name)
    compile_for_tpu(fn, *args, topology="v5p:2x2x1")


def estimate(name: str) -> int | None:
    dump = Path(tempfile.mkdtemp(prefix=f"llo_{name}_"))
    logs = Path(tempfile.mkdtemp(prefix="tpu_logs_"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_LOG_DIR=str(logs),
               LIBTPU_INIT_ARGS=f"--xla_jf_dump_static_llo_profile_to={dump}")
    subprocess.run([sys.executable, "-m", "benchmarks.static_profile", "--child", name], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    cycles = [int(m) for f in dump.iterdir() for m in re.findall(r"estimated_cycles: (\d+)", f.read_text())]
    shutil.rmtree(dump, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)  # libtpu's logs can grow large
    return sum(cycles) if cycles else None


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    results: dict[str, int | None] = {}
    for name, (desc, base) in CASES.items():
        results[name] = c = estimate(name)
        ratio = ""
        if c and base and results.get(base):
            ratio = f"  x{results[base] / c:.1f} fewer cycles than {base}"
        print(f"{desc:<72s} {c / 1e6 if c else float('nan'):8.3f} M cycles{ratio}", flush=True)


if __name__ == "__main__":
    main()
