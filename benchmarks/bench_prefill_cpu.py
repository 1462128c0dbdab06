"""CPU prefill throughput: glmjax against transformers 5.23 on the same checkpoint, side by side.

    .venv/bin/python -m benchmarks.bench_prefill_cpu --hf-python /tmp/hf/bin/python

The checkpoint is an 8-layer, 32-expert GLM-MoE-DSA model (BENCH_CONFIG: hidden 512, top-8 of 32 experts,
DSA with index_topk 128 < T) with random weights, written by transformers' own `save_pretrained` (hub
layout, per-expert keys) the first time, into --checkpoint. Both sides run the same [batch, seq] token ids
in float32, one after the other on the same cores: transformers in its own environment (python3.11 with
torch 2.13.0 CPU and transformers 5.23, see tests/golden/requirements.txt), launched as a subprocess of
this script (`--worker ...`), glmjax in this process under `jax.jit`. Each side is timed over --repeats
forwards after a warm-up (compile, for glmjax); the median is reported, and the logits of the two are
compared so the numbers are for the same computation. Where a query sees more than index_topk keys, DSA
selects keys by a top-k that rounding-level differences can flip at near-ties (transformers' own eager and
sdpa attentions disagree there too), so the check is exact agreement below index_topk and the share of
positions that agree beyond it.

This file imports only the standard library at the top: the transformers worker runs it without jax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.hf_side import add_arguments, check_hf_python, ensure_checkpoint, make_checkpoint, run_worker

BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
    q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    index_n_heads=8, index_head_dim=64, index_topk=128, index_topk_freq=2, index_skip_topk_offset=2,
    first_k_dense_replace=1, intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=32,
    n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, rms_norm_eps=1e-5, initializer_range=0.02, max_position_embeddings=4096,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False,
)
DEFAULT_CKPT = Path(tempfile.gettempdir()) / "glmjax_bench_prefill_ckpt"


# ------------------------------------------------------------------------------ transformers side (worker)


def hf_make(ckpt: Path) -> None:
    make_checkpoint(ckpt, BENCH_CONFIG)


def hf_time(ckpt: Path, ids_file: Path, repeats: int, out_file: Path) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import GlmMoeDsaForCausalLM

    model = GlmMoeDsaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(ids_file)["ids"].astype(np.int64))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first call is the warm-up
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            if i:
                times.append(time.perf_counter() - t0)
    np.save(out_file, logits.float().numpy())
    print(json.dumps(dict(times=times, torch=torch.__version__, transformers=transformers.__version__,
                          threads=torch.get_num_threads(), attn=model.config._attn_implementation)))


# --------------------------------------------------------------------------------------------- glmjax side


def glmjax_time(ckpt: Path, ids, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import glmjax

    model = glmjax.load_pretrained(ckpt, options=glmjax.ModelOptions(dtype=jnp.float32, param_dtype=jnp.float32))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)
    ids = jnp.asarray(ids)
    t0 = time.perf_counter()
    forward(state, ids).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = forward(state, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times, compile_s, np.asarray(logits), jax.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, DEFAULT_CKPT, ("make", "time"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    if args.worker == "make":
        hf_make(args.checkpoint)
        return 0
    if args.worker == "time":
        hf_time(args.checkpoint, args.ids, args.repeats, args.out)
        return 0

    check_hf_python(ap, args.hf_python)
    import numpy as np

    def worker(*extra):
        return run_worker(args.hf_python, "benchmarks.bench_prefill_cpu", args.checkpoint, *extra)

    ensure_checkpoint(args.hf_python, "benchmarks.bench_prefill_cpu", args.checkpoint)

    vocab = BENCH_CONFIG["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.npz", Path(tmp) / "hf_logits.npy"
        np.savez(ids_file, ids=ids)
        hf = json.loads(worker("--worker", "time", "--ids", str(ids_file), "--out", str(out_file),
                               "--repeats", str(args.repeats)).strip().splitlines()[-1])
        hf_logits = np.load(out_file)
    jx_times, compile_s, jx_logits, jax_version = glmjax_time(args.checkpoint, ids, args.repeats)

    tokens = args.batch * args.seq
    hf_s, jx_s = statistics.median(hf["times"]), statistics.median(jx_times)
    row_diff = np.abs(jx_logits - hf_logits).max(-1)  # [B, T]
    dense = BENCH_CONFIG["index_topk"]  # queries that see <= index_topk keys attend to all of them
    print(f"prefill, batch {args.batch} x {args.seq} tokens, float32, {os.cpu_count()} CPUs, median of "
          f"{args.repeats} (checkpoint {args.checkpoint})")
    print(f"  transformers: {hf_s:7.3f} s  {tokens / hf_s:8.1f} tokens/s   ({hf['transformers']}, torch "
          f"{hf['torch']}, {hf['threads']} threads, attn {hf['attn']})")
    print(f"  glmjax:       {jx_s:7.3f} s  {tokens / jx_s:8.1f} tokens/s   (jax {jax_version}, compile "
          f"{compile_s:.1f} s)")
    print(f"  ratio glmjax / transformers: {hf_s / jx_s:.2f}x")
    print(f"  logits: max |diff| {row_diff[:, :dense].max():.1e} over positions < index_topk; beyond, "
          f"{(row_diff[:, dense:] < 1e-3).mean():.1%} of positions within 1e-3 (the others: DSA top-k "
          "selections flipped by rounding-level differences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
