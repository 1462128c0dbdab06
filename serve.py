"""Batch generation from the command line.

    python serve.py                          # tiny demo model: random weights, saved and reloaded in HF format
    python serve.py --checkpoint DIR --prompt-ids 151331,151333,9707 --max-new-tokens 16

For now this runs the no-cache greedy reference decoder; the KV-cache engine and MTP speculative decoding
replace it in the serving issues.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

import glmjax
from glmjax.errors import GlmjaxError
from glmjax.model.inputs import check_prompts
from glmjax.serve import greedy_decode_reference
from glmjax.weights import HFCheckpoint

DEMO_CONFIG = Path(__file__).parent / "configs" / "tiny-demo.json"


def demo_checkpoint(tmp: Path) -> Path:
    """Writes a randomly initialised tiny GLM-MoE-DSA (with its MTP layer) as a Hugging Face checkpoint."""
    cfg = glmjax.load_config(DEMO_CONFIG)
    model = glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(), rngs=nnx.Rngs(0))
    glmjax.save_pretrained(model, tmp / "tiny-demo")
    return tmp / "tiny-demo"


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
    """A non-negative integer (the argparse type of --max-new-tokens)."""
    if not text.strip().isascii() or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="HF checkpoint directory (default: the tiny demo model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-ids", type=prompt_ids, default="5,17,42,99,7,300,12,64",
                    help="comma-separated token ids; separate several prompts with ';'")
    ap.add_argument("--max-new-tokens", type=count, default=12)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    # Everything about the inputs is checked before any weight is read or the demo model is built: the
    # checkpoint's config and headers (HFCheckpoint reads no tensor data), then the prompts against them.
    cfg = HFCheckpoint(args.checkpoint).config if args.checkpoint else glmjax.load_config(DEMO_CONFIG)
    prompts = args.prompt_ids
    check_prompts(cfg, prompts, args.max_new_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or demo_checkpoint(Path(tmp))
        t0 = time.perf_counter()
        model = glmjax.load_pretrained(path, dtype=getattr(jnp, args.dtype))
        cfg = model.config
        print(f"loaded {path.name}: {cfg.num_hidden_layers} layers ({cfg.num_full_indexer_layers} with an indexer), "
              f"{cfg.num_parameters() / 1e6:.2f}M parameters, MTP layers {cfg.num_nextn_predict_layers}, "
              f"in {time.perf_counter() - t0:.1f}s")
        ids = jnp.asarray([prompts[0]], jnp.int32)
        out = model(ids)
        last = np.asarray(out.logits[0, -1])
        top = np.argsort(-last)[:5]
        print(f"logits {tuple(out.logits.shape)}; last position top-5: "
              + ", ".join(f"{t}:{last[t]:.3f}" for t in top))
        if out.mtp_logits is not None:
            print(f"MTP logits {tuple(out.mtp_logits.shape)}")
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
        t0 = time.perf_counter()
        gen = greedy_decode_reference(model, prompts, args.max_new_tokens, [e for e in eos if e is not None])
        for p, g in zip(prompts, gen, strict=True):
            print(f"prompt {p} -> greedy {g}")
        print(f"decoded in {time.perf_counter() - t0:.1f}s")


def main(argv=None) -> int:
    """Exit status 0; 2 for malformed arguments (argparse: usage and the error); 1 for a bad checkpoint,
    config or prompt, printed as one line `error: ...` on stderr."""
    args = parse_args(argv)
    try:
        run(args)
    except GlmjaxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
