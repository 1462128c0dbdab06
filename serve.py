"""Batch generation with GLM-5.2 (glm_moe_dsa checkpoints): a KV-cache engine with continuous batching and MTP
speculative decoding.

    python serve.py                                  # the bundled demo model completes a few Python prompts
    python serve.py --prompt "def quicksort(xs):" --max-tokens 64 --temperature 0.7
    python serve.py --checkpoint DIR --input requests.jsonl --output results.jsonl
    python serve.py --checkpoint DIR --prompt-ids 151331,151333,9707 --max-tokens 16
    python serve.py --checkpoint DIR --mesh tensor=4,expert=2 --input ... --output ...
    python serve.py --compile-only --topology v5p:4x4x4 --mesh tensor=4,expert=16 --slots 64 --max-len 131072

--input is an OpenAI batch file (one {"custom_id", "method", "url", "body"} per line, /v1/completions or
/v1/chat/completions), as vLLM's run-batch reads it; --output gets one result or error record per line. A
rerun with the same --output answers only the requests not yet in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--compile-only" in sys.argv:
    # libtpu compiles for the named topology on this host (set before jax starts); nothing runs on a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax.numpy as jnp  # noqa: E402

import glmjax  # noqa: E402
from glmjax.errors import GlmjaxError, InputError  # noqa: E402
from glmjax.model.inputs import check_prompts  # noqa: E402
from glmjax.serve.batch_runner import BatchReport, count_lines, run_batch  # noqa: E402
from glmjax.serve.engine import Engine, EngineConfig  # noqa: E402
from glmjax.serve.requests import Request, SamplingParams  # noqa: E402
from glmjax.serve.text import TextCodec  # noqa: E402
from glmjax.sharding import MESH_AXES, make_mesh  # noqa: E402
from glmjax.weights import HFCheckpoint  # noqa: E402

DEMO = Path(__file__).parent / "models" / "demo"
# Prompts end before the newline: the demo tokenizer merges a newline with the next line's indent.
DEMO_PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n\ndef main():",
                "class Stack:\n    def __init__(self):", "    for i in range(len(items)):")


def demo_checkpoint() -> Path:
    """The bundled demo model (models/demo: trained by `python train.py`, see its README)."""
    return DEMO


def prompt_ids(text: str) -> list[list[int]]:
    """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]] (the argparse type of --prompt-ids: syntax only, ranges later)."""
    prompts = []
    for i, p in enumerate(text.split(";")):
        items = [t.strip() for t in p.split(",")]
        bad = next((t for t in items if not t.isascii() or not t.isdigit()), None)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"prompt {i + 1}: {bad!r} is not a non-negative integer token id "
                                             "(expected e.g. 5,17,42;7,300)")
        prompts.append([int(t) for t in items])
    return prompts


def count(text: str) -> int:
    """A non-negative integer (argparse type)."""
    if not text.strip().isascii() or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def mesh_shape(text: str) -> dict[str, int]:
    """'tensor=4,expert=2' -> {"tensor": 4, "expert": 2} (argparse type of --mesh)."""
    shape = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if name.strip() not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected axis=size with an axis of {MESH_AXES}")
        shape[name.strip()] = int(size)
    return shape


def axis_names(text: str) -> tuple[str, ...]:
    """'context,expert' -> ("context", "expert") (argparse type of --kv-seq-axes)."""
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in names if a not in MESH_AXES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated mesh axes of {MESH_AXES}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="HF checkpoint directory (default: the bundled demo model)")
    io = ap.add_argument_group("what to generate (default: the demo's Python prompts)")
    io.add_argument("--input", type=Path, help="OpenAI batch file (JSONL) of requests")
    io.add_argument("--output", type=Path, help="results file (JSONL); required with --input")
    io.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    io.add_argument("--prompt-ids", type=prompt_ids, help="token-id prompts: comma-separated ids, ';' between prompts")
    io.add_argument("--return-token-ids", action="store_true", help="add the token ids to every output line")
    sp = ap.add_argument_group("sampling (for --prompt / --prompt-ids / the demo; batch lines carry their own)")
    sp.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=count, default=None,
                    help="tokens to generate (default 64)")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--seed", type=int, default=None)
    en = ap.add_argument_group("engine")
    en.add_argument("--num-speculative-tokens", type=count, default=None,
                    help="MTP draft steps per verification (default 3 with an MTP layer, else 0)")
    en.add_argument("--draft-sampling", choices=["greedy", "sample"], default="greedy")
    en.add_argument("--slots", type=count, default=8, help="sequences decoded together")
    en.add_argument("--max-len", type=count, default=None,
                    help="prompt + completion tokens per request (default min(2048, max_position_embeddings))")
    en.add_argument("--prefill-chunk", type=count, default=256, help="prompt tokens per request and prefill call")
    en.add_argument("--prefill-batch", type=count, default=1,
                    help="waiting requests prefilled together, a chunk of each per call (activations grow with it)")
    en.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    en.add_argument("--mesh", type=mesh_shape, help="shard over the local devices, e.g. tensor=4,expert=2")
    en.add_argument("--kv-seq-axes", type=axis_names, default=("context",),
                    help="mesh axes every request's KV cache is split over along the sequence (default context; "
                         "context,expert for a few long requests: their slots are then not split over expert)")
    en.add_argument("--page-size", type=count, default=None,
                    help="a paged KV cache of pages of this many tokens (default: one max-len slot per sequence; "
                         "the TPU kernels take a multiple of 128)")
    en.add_argument("--num-pages", type=count, default=None,
                    help="pages in the paged cache (default slots x max-len / page-size); a request waits until "
                         "the pages of its prompt + max_tokens are free")
    en.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="fp8: latent rows in float8 e4m3 with per-row scales (rope dims unquantized) and 8-bit "
                         "indexer keys with per-token scales: 1.7-1.8x fewer cache bytes; auto: the compute dtype")
    en.add_argument("--scan-layers", action="store_true",
                    help="run the stacked IndexShare groups in a lax.scan (faster compiles); by default every "
                         "group has its own weights, which a scan would copy out of the stack on every step")
    co = ap.add_argument_group("ahead-of-time compile for a TPU topology (runs on any host with libtpu)")
    co.add_argument("--compile-only", action="store_true",
                    help="compile the engine's step for --topology under --mesh and print per-chip memory")
    co.add_argument("--topology", default="v5p:4x4x4")
    co.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "glm-5.2.json",
                    help="model config.json for --compile-only (default GLM-5.2; --checkpoint's if given)")
    co.add_argument("--program", choices=["speculative", "prefill"], default="speculative")
    args = ap.parse_args(argv)
    if (args.input is None) != (args.output is None):
        ap.error("--input and --output go together")
    if args.input is not None and (args.prompt or args.prompt_ids):
        ap.error("--input runs a batch file; --prompt / --prompt-ids are not used with it")
    return args


def max_len(args, cfg) -> int:
    """The engine's tokens per request, checked against the model and the requested completion length."""
    n = args.max_len or min(2048, cfg.max_position_embeddings)
    if n > cfg.max_position_embeddings:
        raise InputError(f"--max-len: {n} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    if args.max_tokens is not None and args.max_tokens >= n:
        raise InputError(f"--max-tokens: {args.max_tokens} new tokens leave no room for a prompt within --max-len "
                         f"{n} (max_position_embeddings={cfg.max_position_embeddings})")
    return n


def kv_quant(args) -> str:
    return "fp8" if args.kv_cache_dtype == "fp8" else "none"


def build_engine(args, cfg) -> tuple[Engine, TextCodec | None, float]:
    path = args.checkpoint or demo_checkpoint()
    t0 = time.perf_counter()
    dtype = getattr(jnp, args.dtype)
    model = glmjax.load_pretrained(path, options=glmjax.ModelOptions(dtype=dtype, param_dtype=dtype,
                                                                     scan_layers=args.scan_layers))
    mesh = None
    if args.mesh:
        try:
            mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise InputError(f"--mesh: {e}") from None
    k = args.num_speculative_tokens
    if k is None:
        k = 3 if cfg.num_nextn_predict_layers else 0
    config = EngineConfig(slots=args.slots, max_len=max_len(args, cfg),
                          prefill_chunk=args.prefill_chunk, prefill_batch=args.prefill_batch, num_speculative_tokens=k,
                          draft_sampling=args.draft_sampling, kv_seq_axes=args.kv_seq_axes,
                          kv_quant=kv_quant(args), page_size=args.page_size, num_pages=args.num_pages)
    codec = TextCodec.from_checkpoint(path)
    return Engine(model, config, mesh=mesh, codec=codec), codec, time.perf_counter() - t0


def prompts_run(args, engine: Engine, codec: TextCodec | None) -> None:
    texts = args.prompt or ([] if args.prompt_ids else list(DEMO_PROMPTS))
    if texts and codec is None:
        raise InputError("--prompt: this checkpoint has no tokenizer.json; use --prompt-ids")
    prompts = [codec.encode(t) for t in texts] + (args.prompt_ids or [])
    params = SamplingParams(max_tokens=args.max_tokens or 64, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    requests = [Request(str(i), tuple(p), params, "completion", texts[i] if i < len(texts) else None)
                for i, p in enumerate(prompts)]
    for r in requests:
        engine.check(r)
    engine.generate(requests[:1])  # compile outside the timing
    t0 = time.perf_counter()
    done = engine.generate(requests)
    seconds = time.perf_counter() - t0
    report = BatchReport(seconds=seconds)
    for c in done:
        report.add(c)
        shown = c.request.prompt_text + c.text if codec else f"{list(c.request.prompt_ids)} -> {c.tokens}"
        accept = f", acceptance length {c.acceptance_length:.2f}" if c.accepted else ""
        print(f"--- {c.request.id}: {len(c.tokens)} tokens, {c.finish_reason}{accept}")
        print(shown)
    print("---")
    for line in report.lines():
        print(line)


def batch_run(args, engine: Engine) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = count_lines(args.input)
    name = (args.checkpoint or demo_checkpoint()).name
    columns = (TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("requests", total=total)
        report = run_batch(engine, args.input, args.output, model_name=name, return_token_ids=args.return_token_ids,
                           progress=lambda n: bar.update(task, completed=n))
    for line in report.lines():
        print(line)


def compile_only(args) -> None:
    from glmjax.serve.compile_only import compile_serve_step
    from glmjax.serve.engine import serve_rules

    cfg = HFCheckpoint(args.checkpoint).config if args.checkpoint else glmjax.load_config(args.config)
    k = 3 if args.num_speculative_tokens is None else args.num_speculative_tokens
    report = compile_serve_step(cfg, args.topology, args.mesh or {}, slots=args.slots,
                                max_len=args.max_len or cfg.max_position_embeddings, k=k, program=args.program,
                                prefill_chunk=args.prefill_chunk, prefill_batch=args.prefill_batch,
                                rules=serve_rules(args.kv_seq_axes),
                                kv_quant=kv_quant(args), page_size=args.page_size, num_pages=args.num_pages)
    print(report.table())


def run(args: argparse.Namespace) -> None:
    if args.compile_only:
        return compile_only(args)
    # Inputs are checked before any weight is read: the checkpoint's config and headers (no tensor data),
    # then token-id prompts against them.
    cfg = HFCheckpoint(args.checkpoint).config if args.checkpoint else glmjax.load_config(DEMO / "config.json")
    n = max_len(args, cfg)
    if args.prompt_ids:
        check_prompts(cfg, args.prompt_ids, args.max_tokens or 64)
        longest = max(len(p) for p in args.prompt_ids)
        if longest + (args.max_tokens or 64) > n:
            raise InputError(f"--prompt-ids: a prompt of {longest} tokens + {args.max_tokens or 64} new tokens "
                             f"exceeds --max-len {n}")
    engine, codec, load_s = build_engine(args, cfg)
    c = engine.model.config
    print(f"loaded {(args.checkpoint or DEMO).name}: {c.num_hidden_layers} layers, {c.num_parameters() / 1e6:.2f}M "
          f"parameters, {engine.config.slots} slots x {engine.config.max_len} tokens, "
          f"{engine.k} speculative tokens, in {load_s:.1f} s")
    if args.input is not None:
        batch_run(args, engine)
    else:
        prompts_run(args, engine, codec)


def main(argv=None) -> int:
    """Exit status 0; 2 for malformed arguments (argparse: usage and the error); 1 for a bad checkpoint,
    config, prompt or file, printed as one line `error: ...` on stderr."""
    args = parse_args(argv)
    try:
        run(args)
    except GlmjaxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
