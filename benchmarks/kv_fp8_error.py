"""FP8 KV cache: the logit error against the bf16 cache, and the capacity it buys.

    .venv/bin/python -m benchmarks.kv_fp8_error [--tokens 512] [--chunk 64]

For each model (the golden fixtures, random weights at tiny dims, and the trained demo model) the same token
sequence runs through the serving path (`glmjax.serve.forward.target_forward` chunk by chunk, every chunk
attending over the cache the earlier ones wrote) with five caches: float32, bf16, and FP8 (latent rows
float8_e4m3fn with per-row scales, rope dims bf16) with indexer keys int8 (the reference's) or
float8_e4m3fn (the GPU kernel's) with per-token scales, and the TPU layout of the first (values packed in
uint32 words, the rope lane-padded; glmjax.serve.kv_cache: the same numbers, so the same error). The model
computes in float32 every time, so the differences are the cache formats' alone. Reported per model, each
FP8 cache against bf16 and, for scale, bf16 against float32, over every position after the first chunk
(the ones that read cached rows): the largest |logit difference|, the mean |difference| relative to the
logits' standard deviation, the mean KL(p_ref || p) in nats and the top-1 agreement. Then the cache bytes
per token for GLM-5.2 in each format.

The demo model's tokens are Python source from this repository's own code; the fixtures' are random ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import glmjax
from glmjax.serve.forward import target_forward
from glmjax.serve.kv_cache import Rows, bytes_per_token, init_cache

REPO = Path(__file__).resolve().parents[1]
FIXTURES = ("allfull_nomtp", "indexshare_freq", "indexshare_pattern")


def cache_logits(model, tokens: np.ndarray, *, quant: str, chunk: int, dtype=jnp.bfloat16,
                 key_dtype=jnp.int8, lane_padded: bool = False) -> np.ndarray:
    """tokens [B, T] int -> logits [B, T, V] float32 through the KV-cache forward, `chunk` tokens per call, the
    cache in `dtype` (quant "none") or FP8 (quant "fp8", rope dims in dtype, indexer keys in key_dtype; with
    lane_padded, the TPU layout: values and int8 keys packed in uint32 words)."""
    B, T = tokens.shape
    cache = init_cache(model.config, B, T, mtp=False, dtype=dtype, scan_layers=model.options.scan_layers,
                       quant=quant, key_dtype=key_dtype, lane_padded=lane_padded)

    @jax.jit
    def step(cache, ids, start):
        rows = Rows(None, jnp.full((B,), start, jnp.int32), jnp.full((B,), ids.shape[1], jnp.int32))
        cache, hidden = target_forward(model, cache, ids, rows)
        return cache, model.head(hidden).astype(jnp.float32)

    out = []
    for s in range(0, T, chunk):
        cache, logits = step(cache, jnp.asarray(tokens[:, s:s + chunk]), s)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Logit error statistics of got against ref ([B, T, V] float32 each)."""
    diff = np.abs(got - ref)
    logp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    logq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    return dict(max_abs=float(diff.max()), rel_mean=float(diff.mean() / ref.std()), kl=float(kl.mean()),
                top1=float(np.mean(ref.argmax(-1) == got.argmax(-1))))


def demo_tokens(model_dir: Path, n: int, batch: int) -> np.ndarray:
    from glmjax.serve.text import TextCodec

    codec = TextCodec.from_checkpoint(model_dir)
    text = "".join(p.read_text() for p in sorted((REPO / "glmjax" / "serve").glob("*.py")))
    ids = codec.encode(text)
    return np.stack([ids[i * n:(i + 1) * n] for i in range(batch)]).astype(np.int32)


def measure(path: Path, tokens: np.ndarray | None, n: int, chunk: int, batch: int) -> dict:
    """`compare`'s statistics of the FP8 cache (int8 or fp8 indexer keys) against the bf16 cache, and of the bf16
    cache against a float32 one."""
    model = glmjax.load_pretrained(path, options=glmjax.ModelOptions(q_block=64))
    if tokens is None:
        rng = np.random.default_rng(0)
        tokens = rng.integers(2, model.config.vocab_size, (batch, n)).astype(np.int32)
    f32 = cache_logits(model, tokens, quant="none", chunk=chunk, dtype=jnp.float32)
    bf16 = cache_logits(model, tokens, quant="none", chunk=chunk)
    int8_keys = cache_logits(model, tokens, quant="fp8", chunk=chunk)
    fp8_keys = cache_logits(model, tokens, quant="fp8", chunk=chunk, key_dtype=jnp.float8_e4m3fn)
    tpu = cache_logits(model, tokens, quant="fp8", chunk=chunk, lane_padded=True)
    cut = lambda x: x[:, chunk:]  # noqa: E731
    return {"fp8, int8 keys": compare(cut(bf16), cut(int8_keys)), "fp8, fp8 keys": compare(cut(bf16), cut(fp8_keys)),
            "fp8, TPU layout": compare(cut(bf16), cut(tpu)), "bf16 vs f32": compare(cut(f32), cut(bf16))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per cache call")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.batch} sequences x {args.tokens} tokens, {args.chunk} per call; float32 compute; "
          f"positions after the first chunk")
    print(f"{'model':<22s} {'cache':<16s} {'max |dlogit|':>12s} {'mean |d| / std':>15s} {'KL (nats)':>11s} "
          f"{'top-1 agree':>12s}")
    runs = [(name, REPO / "tests" / "golden" / name, None) for name in FIXTURES]
    demo = REPO / "models" / "demo"
    runs.append(("demo (trained)", demo, demo_tokens(demo, args.tokens, args.batch)))
    for name, path, tokens in runs:
        res = measure(path, tokens, args.tokens, args.chunk, args.batch)
        for label, r in res.items():
            print(f"{name:<22s} {label:<16s} {r['max_abs']:12.4f} {r['rel_mean']:15.2e} {r['kl']:11.2e} "
                  f"{100 * r['top1']:11.2f}%")
    cfg = glmjax.load_config(REPO / "configs" / "glm-5.2.json")
    print("\nGLM-5.2 cache bytes per token (78 layers + MTP; indexer keys on the 21 full layers + MTP):")
    for label, kw in [("bf16, 640 wide (TPU)", dict(lane_padded=True)), ("bf16, 576 wide (GPU)", {}),
                      ("fp8, TPU layout", dict(quant="fp8", lane_padded=True)),
                      ("fp8 + fp8 keys (GPU)", dict(quant="fp8", key_dtype=jnp.float8_e4m3fn))]:
        b = bytes_per_token(cfg, mtp=True, **kw)
        print(f"  {label:<24s} {b:9,d} bytes   1M tokens: {b * 2**20 / 2**30:7.1f} GiB")


if __name__ == "__main__":
    main()
