"""Generation throughput on this CPU: glmjax's engine (plain KV-cache decoding and MTP speculative decoding)
against transformers' `generate`, side by side in one run.

    .venv/bin/python -m benchmarks.bench_generate --hf-python /tmp/hf/bin/python

Part 1, the 8-layer 32-expert checkpoint of bench_prefill_cpu (random weights, written by transformers'
`save_pretrained` the first time, so without an MTP layer): batch 4 x 256-token prompts (random ids), greedy,
64 new tokens each (EOS ignored), float32. transformers runs `generate` (its KV cache, `use_cache=True`) in
its own environment as a subprocess of this script; glmjax runs the engine with 4 slots, the 4 prompts
prefilled together (EngineConfig.prefill_batch, as transformers prefills its batch), its layers unscanned as
serve.py loads them, and for comparison scanned (ModelOptions.scan_layers). Each side
is timed after a warm-up run (compilation, for glmjax), the median of --repeats runs; the greedy tokens of the
two are compared (DSA's top-k can flip at rounding-level near-ties, so agreement is reported, not asserted).

Part 2, the trained demo model (models/demo): the engine on Python prompts, plain against 3 speculative
tokens, with the acceptance length. A random model's MTP layer predicts nothing, so this is where
speculation is measured.

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

from benchmarks.hf_side import add_arguments, check_hf_python, ensure_checkpoint, run_worker

REPO = Path(__file__).resolve().parents[1]


def hf_generate(ckpt: Path, ids_file: Path, new: int, repeats: int, out_file: Path) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import GlmMoeDsaForCausalLM

    model = GlmMoeDsaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(ids_file)["ids"].astype(np.int64))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first run is the warm-up
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=True, pad_token_id=0)
            if i:
                times.append(time.perf_counter() - t0)
    np.save(out_file, out[:, ids.shape[1]:].numpy())
    print(json.dumps(dict(times=times, torch=torch.__version__, transformers=transformers.__version__,
                          threads=torch.get_num_threads())))


def engine_time(model, prompts, new: int, k: int, repeats: int, slots: int, max_len: int, chunk: int):
    """-> (median seconds, completions of the last run, engine steps of the last run and their median ms)."""
    from glmjax.serve.engine import Engine, EngineConfig
    from glmjax.serve.requests import Request, SamplingParams

    engine = Engine(model, EngineConfig(slots=slots, max_len=max_len, prefill_chunk=chunk, prefill_batch=slots,
                                        num_speculative_tokens=k))
    requests = [Request(str(i), tuple(int(t) for t in p),
                        SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), "completion")
                for i, p in enumerate(prompts)]
    engine.generate(requests)  # compile
    times, step_ms, out = [], [], None
    for _ in range(repeats):
        engine.stats.update(step_s=0.0, steps=0)
        t0 = time.perf_counter()
        out = engine.generate(requests)
        times.append(time.perf_counter() - t0)
        step_ms.append(1e3 * engine.stats["step_s"] / max(engine.stats["steps"], 1))
    return statistics.median(times), out, engine.stats["steps"], statistics.median(step_ms)


def acceptance(out) -> str:
    steps = sum(len(c.accepted) for c in out)
    return f"{sum(len(c.tokens) - 1 for c in out) / steps:.2f}" if steps else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, Path(tempfile.gettempdir()) / "glmjax_bench_prefill_ckpt", ("make", "generate"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-new", type=int, default=128)
    args = ap.parse_args(argv)

    if args.worker == "make":
        from benchmarks.bench_prefill_cpu import hf_make
        hf_make(args.checkpoint)
        return 0
    if args.worker == "generate":
        hf_generate(args.checkpoint, args.ids, args.new, args.repeats, args.out)
        return 0
    check_hf_python(ap, args.hf_python)

    def worker(*extra):
        return run_worker(args.hf_python, "benchmarks.bench_generate", args.checkpoint, *extra)

    ensure_checkpoint(args.hf_python, "benchmarks.bench_generate", args.checkpoint)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import glmjax
    from benchmarks.bench_prefill_cpu import BENCH_CONFIG
    from serve import DEMO, DEMO_PROMPTS

    # As serve.py loads: float32 here, every IndexShare group with its own weights (no scan).
    F32_SERVING = glmjax.ModelOptions(dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False)

    B, P, N = args.batch, args.prompt_len, args.new
    ids = np.random.default_rng(0).integers(2, BENCH_CONFIG["vocab_size"], (B, P)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.npz", Path(tmp) / "hf_tokens.npy"
        np.savez(ids_file, ids=ids)
        hf = json.loads(worker("--worker", "generate", "--ids", str(ids_file), "--out", str(out_file),
                               "--new", str(N), "--repeats", str(args.repeats)).strip().splitlines()[-1])
        hf_tokens = np.load(out_file)
    hf_s = statistics.median(hf["times"])

    max_len = P + N + 8
    model = glmjax.load_pretrained(args.checkpoint, options=F32_SERVING)
    plain_s, plain, _, _ = engine_time(model, ids, N, 0, args.repeats, B, max_len, P)
    del model
    scanned = glmjax.load_pretrained(args.checkpoint, dtype=jnp.float32)  # ModelOptions.scan_layers=True
    scanned_s, *_ = engine_time(scanned, ids, N, 0, args.repeats, B, max_len, P)
    del scanned
    # transformers' checkpoint has no MTP layer (transformers does not build it); random weights would draft
    # nothing anyway: speculation is measured on the demo model below.
    same = np.array([c.tokens for c in plain]) == hf_tokens
    first_diff = [int(np.argmin(r)) if not r.all() else N for r in same]
    print(f"generate, {B} x {P}-token prompts, {N} new tokens each, greedy, float32, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} (jax {jax.__version__}, transformers {hf['transformers']}, torch {hf['torch']}, "
          f"{hf['threads']} threads)")
    rows = [("transformers generate", hf_s, "-"), ("glmjax plain decode", plain_s, "-"),
            ("glmjax plain, scanned layers", scanned_s, "-")]
    for name, s, acc in rows:
        print(f"  {name:<30s} {s:7.3f} s  {B * N / s:8.1f} tokens/s  {hf_s / s:6.2f}x transformers  "
              f"acceptance length {acc}")
    print(f"  glmjax == transformers: {same.mean():.1%} of tokens (first divergence per row: {first_diff})",
          flush=True)

    from tokenizers import Tokenizer
    demo = glmjax.load_pretrained(DEMO, options=F32_SERVING)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in DEMO_PROMPTS]
    M = args.demo_new
    ml = max(len(p) for p in prompts) + M + 8
    d_plain_s, d_plain, d_steps, d_ms = engine_time(demo, prompts, M, 0, args.repeats, len(prompts), ml, 64)
    print(f"demo model ({demo.config.num_parameters() / 1e6:.2f}M parameters), {len(prompts)} Python prompts, "
          f"{M} new tokens each, greedy; engine steps after the prefill and their median time")
    print(f"  {'plain decode':<30s} {d_plain_s:7.3f} s  {len(prompts) * M / d_plain_s:8.1f} tokens/s  "
          f"{d_steps} steps of {d_ms:.2f} ms")
    for k in (1, 2, 3, 5):
        s, out, steps, ms = engine_time(demo, prompts, M, k, args.repeats, len(prompts), ml, 64)
        same = [c.tokens for c in out] == [c.tokens for c in d_plain]
        print(f"  {f'speculative k={k}':<30s} {s:7.3f} s  {len(prompts) * M / s:8.1f} tokens/s  "
              f"{steps} steps of {ms:.2f} ms ({ms / d_ms:.2f}x a decode step)  {d_plain_s / s:5.2f}x plain  "
              f"acceptance length {acceptance(out)}  same tokens {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
