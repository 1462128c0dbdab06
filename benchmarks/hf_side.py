"""The transformers side of the side-by-side benchmarks: a worker subprocess in transformers' own
environment (python3.11, torch CPU; see tests/golden/requirements.txt), so glmjax never imports torch.

A benchmark module runs itself as the worker (`<hf-python> -m benchmarks.<name> --worker ...`) and reads
its stdout. Standard library only at the top: the worker's environment has no jax.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HF_PYTHON_DEFAULT = os.environ.get("GLMJAX_HF_PYTHON", "/tmp/hf/bin/python")
HF_PYTHON_HELP = "python of the transformers environment (default $GLMJAX_HF_PYTHON or /tmp/hf/bin/python)"


def add_arguments(ap, checkpoint: Path, workers: tuple[str, ...]) -> None:
    """The arguments every side-by-side benchmark takes: --hf-python, --checkpoint (written by transformers if
    missing), and the hidden worker ones (--worker, one of `workers`; --ids and --out files)."""
    import argparse

    ap.add_argument("--hf-python", default=HF_PYTHON_DEFAULT, help=HF_PYTHON_HELP)
    ap.add_argument("--checkpoint", type=Path, default=checkpoint, help="written by transformers if missing")
    ap.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    ap.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def check_hf_python(ap, hf_python: str) -> None:
    """argparse error with the set-up command when the transformers environment is missing."""
    if not Path(hf_python).exists():
        ap.error(f"--hf-python {hf_python} not found (or set GLMJAX_HF_PYTHON); create the environment with: "
                 "python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install -r tests/golden/requirements.txt")


def run_worker(hf_python: str, module: str, checkpoint: Path, *extra: str) -> str:
    """Runs `hf_python -m module --checkpoint checkpoint *extra` from the repository root without the XLA /
    JAX environment variables -> its stdout (its stderr and an exit on failure)."""
    cmd = [hf_python, "-m", module, "--checkpoint", str(checkpoint), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"transformers worker failed: {' '.join(cmd)}")
    return done.stdout


def ensure_checkpoint(hf_python: str, module: str, checkpoint: Path) -> None:
    """Has the worker write the benchmark checkpoint (`--worker make`) unless it exists."""
    if not (checkpoint / "config.json").exists():
        print(f"writing the benchmark checkpoint with transformers to {checkpoint}", flush=True)
        run_worker(hf_python, module, checkpoint, "--worker", "make")


def make_checkpoint(ckpt: Path, config: dict) -> None:
    """(In the worker) a GlmMoeDsaForCausalLM of `config` with seeded random weights and a non-zero router
    correction bias (so routing exercises it), written by transformers' own save_pretrained."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**config)).eval()
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.data = 0.1 * torch.randn_like(m.e_score_correction_bias)
    model.save_pretrained(ckpt)
