"""Training GLM-MoE-DSA models: the embedded demo on a CPU, or GLM-5.2 mid-training on a TPU pod.

    python train.py                                          # the demo (configs/train/demo.toml)
    python train.py --config configs/train/demo --set run.steps=50 --set run.output_dir=/tmp/demo
    python train.py --config configs/train/glm-5.2-midtrain-128k          # on every host of a pod
    python train.py --config configs/train/glm-5.2-midtrain-128k --compile-only --topology v5p:8x8x8

A run resumes from the last checkpoint in its checkpoint directory. docs/training.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys

from glmjax.errors import GlmjaxError


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="a preset name in configs/train/ or a TOML file (default: demo)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one field (repeatable); the value is read as TOML")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the train step ahead of time for --topology and print per-chip memory")
    ap.add_argument("--topology", default="v5p:8x8x8", help="TPU topology for --compile-only")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        # libtpu compiles for the named topology on this host; the computation itself never runs.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from glmjax.train.config import load_train_config

        cfg = load_train_config(args.config, args.set)
        if args.print_config:
            import json

            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        if args.compile_only:
            from glmjax.train.compile_only import compile_train_step

            print(compile_train_step(cfg, args.topology).table())
            return 0
        import jax

        if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
            jax.distributed.initialize()  # a multi-host pod: before any other jax call
        from glmjax.train.trainer import Trainer

        trainer = Trainer(cfg)
        try:
            last = trainer.fit()
        finally:
            trainer.close()
        if last:
            keys = [k for k in ("train/loss", "val/lm_loss", "val/unigram_entropy", "val/mtp_accuracy/1",
                                "val/mtp_accuracy/2") if k in last]
            print("final: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys))
        return 0
    except GlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
