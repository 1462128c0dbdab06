"""CPU training throughput: glmjax's train step against transformers 5.23 (torch, CPU) on the same checkpoint
and batches, side by side in one run.

    .venv/bin/python -m benchmarks.bench_train --hf-python /tmp/hf/bin/python

The checkpoint is an 8.7M-parameter GLM-MoE-DSA model (TRAIN_CONFIG: bench_prefill_cpu's BENCH_CONFIG cut to
hidden 256 and 4 layers, 1 dense + 3 MoE with top-4 of 16 experts, DSA with index_topk 64 < T, IndexShare
full/full/shared/full) with random weights, written by transformers' own `save_pretrained` (hub layout) the
first time, into --checkpoint; glmjax loads the same files (`glmjax.load_pretrained`). Both sides train on
the same --repeats + 1 batches of [batch, seq] random token ids, in float32, one after the other on the same
cores: transformers in its own environment (python3.11 with torch 2.13.0 CPU and transformers 5.23, see
tests/golden/requirements.txt) as a subprocess of this script (`--worker ...`), glmjax in this process. The
first step of each side is the warm-up (glmjax compiles there) and is not timed; the median of the other
--repeats steps is reported, as seconds per step and tokens (batch x seq) per second.

One step on each side:
- glmjax: the trainer's own jitted step (`glmjax.train.trainer.bind_train_step`, built from a TrainConfig as
  train.py builds it, on a one-device mesh): forward, `objective`, float32 gradients, global-norm clipping,
  the optax AdamW update, metrics. Stage "full" (no indexer KL), loss.mtp_steps 0 (transformers'
  GlmMoeDsaForCausalLM builds no MTP layer, so the checkpoint has none), balance_weight 0 and
  bias_update_rate 0 (transformers has neither the balance loss nor the router-bias update), z_loss 0,
  weight decay 0 (torch's AdamW would decay the norms too; glmjax decays matrices only), constant learning
  rate (warmup 0, min_lr_ratio 1).
- transformers: `model(input_ids, labels=input_ids)` in train mode (its mean next-token cross-entropy over
  B x (T-1) tokens, the same tokens and mean as glmjax's LM loss on unpacked rows), `loss.backward()`,
  `clip_grad_norm_`, `torch.optim.AdamW` (torch's defaults otherwise), zero_grad.
Same learning rate, betas, eps and clip norm (OPT) on both sides.

What each computes: both run the DSA indexer at every full layer and attend only to its top-k keys (shared
layers reuse the previous full layer's selection). transformers (attn sdpa or eager) expands the latent into
per-head keys and values and always builds the full [T, S] attention, the non-selected keys masked out.
glmjax attends in the absorbed form (every head over the shared latent rows), per block of queries
(pallas_kernels/sparse_mla/reference.py; q_block 128, more while a block stays under 4M elements): while
S <= 8 * index_topk (the default --seq 256, and 512, with index_topk 64) it too scores every row and masks
the unselected ones; at longer sequences it gathers only the top-k rows, O(T * topk) instead of O(T * S),
which transformers never does.
Neither side trains the indexers here: transformers runs its indexer under `torch.no_grad` (its parameters
get no gradient, and AdamW skips them); glmjax detaches the indexer's inputs and, in stage "full", has no
indexer loss (its AdamW sees zero gradients for them). transformers' routed experts run its default
`experts_implementation` (printed). The first step's losses (and gradient norms) of the two sides are
printed: same weights, same batch, so they should agree closely (DSA's top-k can flip at rounding-level
near-ties, which moves the loss a little: seen 2e-4 at the default sizes, 1e-6 at --seq 64 = index_topk,
where no query has keys to drop); later steps drift apart slowly, as two float32 trainings do.

This file imports only the standard library at the top: the transformers worker runs it without jax.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file (python benchmarks/bench_train.py) rather than with -m
    sys.path.insert(0, str(REPO))

from benchmarks.bench_prefill_cpu import BENCH_CONFIG  # noqa: E402
from benchmarks.hf_side import (  # noqa: E402
    add_arguments,
    check_hf_python,
    ensure_checkpoint,
    make_checkpoint,
    run_worker,
)

TRAIN_CONFIG = dict(
    BENCH_CONFIG, vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=128, index_n_heads=4, index_topk=64, intermediate_size=512,
    moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
)
# AdamW on both sides: constant learning rate, no weight decay, global-norm clipping.
OPT = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, clip=1.0)
_TAG = hashlib.sha1(json.dumps(TRAIN_CONFIG, sort_keys=True).encode()).hexdigest()[:10]
DEFAULT_CKPT = Path(tempfile.gettempdir()) / f"glmjax_bench_train_ckpt_{_TAG}"  # a new config, a new checkpoint


# ------------------------------------------------------------------------------ transformers side (worker)


def hf_make(ckpt: Path) -> None:
    make_checkpoint(ckpt, TRAIN_CONFIG)


def hf_train(ckpt: Path, ids_file: Path) -> dict:
    """One training step per batch of ids_file ([steps, B, T]); the first is the warm-up."""
    import numpy as np
    import torch
    import transformers
    from transformers import GlmMoeDsaForCausalLM

    model = GlmMoeDsaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"], weight_decay=0.0)
    batches = np.load(ids_file)["ids"].astype(np.int64)
    times, losses, norms, no_grad = [], [], [], 0
    for i, host in enumerate(batches):
        t0 = time.perf_counter()
        ids = torch.from_numpy(host)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if i == 0:
            no_grad = sum(p.numel() for p in params if p.grad is None)
        norm = torch.nn.utils.clip_grad_norm_(params, OPT["clip"])
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        norms.append(float(norm))
    return dict(times=times, losses=losses, grad_norms=norms, torch=torch.__version__,
                transformers=transformers.__version__, threads=torch.get_num_threads(),
                attn=model.config._attn_implementation, experts=model.config._experts_implementation,
                params=sum(p.numel() for p in params), no_grad_params=no_grad)


# --------------------------------------------------------------------------------------------- glmjax side


def train_config(ckpt: Path, batch: int, seq: int):
    """The glmjax TrainConfig of the comparison (module docstring)."""
    from glmjax.train.config import load_train_config

    base = {
        "model": {"checkpoint": str(ckpt), "dtype": "float32", "param_dtype": "float32"},
        "data": {"train_files": ["unused"], "seq_len": seq, "global_batch_size": batch},
        "optimizer": {"name": "adamw", "peak_lr": OPT["lr"], "b1": OPT["b1"], "b2": OPT["b2"], "eps": OPT["eps"],
                      "weight_decay": 0.0, "clip_norm": OPT["clip"], "warmup_steps": 0, "min_lr_ratio": 1.0,
                      "total_steps": 1_000_000},
        "loss": {"mtp_steps": 0, "z_loss": 0.0, "balance_weight": 0.0, "bias_update_rate": 0.0},
        "run": {"stage": "full", "output_dir": str(Path(tempfile.gettempdir()) / "glmjax_bench_train_run"),
                "export_hf": False},
    }
    return load_train_config(None, base=base)


def glmjax_train(ckpt: Path, batches) -> dict:
    """One step of glmjax's train step per batch of `batches` ([steps, B, T] int); the first is the warm-up
    (compile). The model and optimizer are built as glmjax.train.trainer.Trainer builds them."""
    import jax
    import numpy as np

    from glmjax.sharding import make_mesh
    from glmjax.train import trainer
    from glmjax.train.optimizer import create_optimizer

    _, B, T = batches.shape
    cfg = train_config(ckpt, B, T)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    times, losses, norms = [], [], []
    with jax.set_mesh(mesh):
        model = trainer.build_model(cfg, trainer.model_config(cfg, None), mesh)
        optimizer = create_optimizer(model, cfg.optimizer, cfg.run.stage, mesh=mesh)
        step = trainer.bind_train_step(cfg, model, optimizer)
        for host in batches:
            t0 = time.perf_counter()
            ids = host.astype(np.int32)
            batch = trainer.put_batch({"input_ids": ids, "segment_ids": np.ones_like(ids)}, mesh)
            scalars, _ = step(batch)
            losses.append(float(scalars["train/loss"]))  # waits for the step
            times.append(time.perf_counter() - t0)
            norms.append(float(scalars["train/grad_norm"]))
    return dict(times=times, losses=losses, grad_norms=norms, jax=jax.__version__)


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, DEFAULT_CKPT, ("make", "train"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per side, after one warm-up step")
    args = ap.parse_args(argv)

    if args.worker == "make":
        hf_make(args.checkpoint)
        return 0
    if args.worker == "train":
        print(json.dumps(hf_train(args.checkpoint, args.ids)))
        return 0

    if args.repeats < 1:
        ap.error("--repeats: must be >= 1")
    check_hf_python(ap, args.hf_python)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # both sides on this CPU, even where jax sees an accelerator
    import numpy as np

    def worker(*extra):
        return run_worker(args.hf_python, "benchmarks.bench_train", args.checkpoint, *extra)

    ensure_checkpoint(args.hf_python, "benchmarks.bench_train", args.checkpoint)

    vocab = TRAIN_CONFIG["vocab_size"]
    batches = np.random.default_rng(0).integers(0, vocab, (args.repeats + 1, args.batch, args.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.npz"
        np.savez(ids_file, ids=batches)
        hf = json.loads(worker("--worker", "train", "--ids", str(ids_file)).strip().splitlines()[-1])
    jx = glmjax_train(args.checkpoint, batches)

    tokens = args.batch * args.seq
    hf_s, jx_s = statistics.median(hf["times"][1:]), statistics.median(jx["times"][1:])
    print(f"training step, batch {args.batch} x {args.seq} tokens, float32, AdamW (lr {OPT['lr']:g}, betas "
          f"{OPT['b1']}/{OPT['b2']}, no weight decay, clip {OPT['clip']:g}), {os.cpu_count()} CPUs, median of "
          f"{args.repeats} steps after 1 warm-up step")
    print(f"  model: {hf['params'] / 1e6:.2f}M parameters ({hf['no_grad_params'] / 1e6:.2f}M in the indexers, "
          f"untrained on both sides), checkpoint {args.checkpoint}")
    spread = lambda t: f"steps {min(t[1:]):.3f}-{max(t[1:]):.3f} s"  # noqa: E731
    print(f"  transformers: {hf_s:7.3f} s/step  {tokens / hf_s:8.1f} tokens/s   ({spread(hf['times'])}; "
          f"transformers {hf['transformers']}, torch {hf['torch']}, {hf['threads']} threads, attn {hf['attn']}, "
          f"experts {hf['experts']})")
    print(f"  glmjax:       {jx_s:7.3f} s/step  {tokens / jx_s:8.1f} tokens/s   ({spread(jx['times'])}; jax "
          f"{jx['jax']}, first step with compile {jx['times'][0]:.1f} s)")
    print(f"  ratio glmjax / transformers (tokens/s): {hf_s / jx_s:.2f}x")
    print(f"  first step (same weights, same batch): loss transformers {hf['losses'][0]:.6f}, glmjax "
          f"{jx['losses'][0]:.6f}, |diff| {abs(hf['losses'][0] - jx['losses'][0]):.1e}; grad norm "
          f"{hf['grad_norms'][0]:.6f} vs {jx['grad_norms'][0]:.6f}")
    if args.seq > TRAIN_CONFIG["index_topk"]:
        print(f"    (seq > index_topk {TRAIN_CONFIG['index_topk']}: DSA's top-k can flip at rounding-level near-ties "
              f"between the two, which moves the loss slightly; at --seq {TRAIN_CONFIG['index_topk']} every query "
              "sees all its keys and the losses agree to float32 rounding)")
    print(f"  last step ({args.repeats + 1}): loss transformers {hf['losses'][-1]:.6f}, glmjax "
          f"{jx['losses'][-1]:.6f}, |diff| {abs(hf['losses'][-1] - jx['losses'][-1]):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
