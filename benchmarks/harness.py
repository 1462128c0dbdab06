"""Shared benchmark plumbing: timing, chip peaks, and one printed line per measurement.

Every script measures the op and its pure-JAX reference side by side in one run and prints the ratio;
on CPU the shapes are small and the kernels run in interpret mode (a smoke test, not a performance figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

# Peak dense bf16 FLOP/s and HBM bytes/s per chip (vendor figures).
PEAKS = {
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "NVIDIA H100": (989e12, 3.35e12),
    "NVIDIA H200": (989e12, 4.8e12),
}


def chip() -> tuple[str, tuple[float, float] | None]:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAKS.items():
        if kind.startswith(name):
            return kind, peak
    return kind, None


def on_accelerator() -> bool:
    return jax.default_backend() in ("tpu", "gpu")


def time_fn(fn, *args, iters: int = 10, warmup: int = 2) -> float:
    """Median wall seconds of fn(*args) (jitted by the caller), after warm-up and compilation."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, seconds: float, flops: float, bytes_: float, baseline: float | None = None,
           vs: str = "reference") -> str:
    kind, peak = chip()
    parts = [f"{name:<48s} {seconds * 1e3:9.3f} ms", f"{flops / seconds / 1e12:8.2f} TFLOP/s",
             f"{bytes_ / seconds / 1e9:8.1f} GB/s"]
    if peak is not None:
        parts.append(f"({100 * flops / seconds / peak[0]:5.1f}% / {100 * bytes_ / seconds / peak[1]:5.1f}% of peak)")
    if baseline is not None:
        parts.append(f"x{baseline / seconds:.2f} vs {vs}")
    line = "  ".join(parts)
    print(line, flush=True)
    return line


def start(argv=None) -> tuple[str, bool]:
    """Parses the scripts' common flags (--impl, --interpret), prints the device, and returns (impl, interpret).

    Off an accelerator the scripts are a smoke test of the interpreted kernels, so interpret is forced on
    there (and printed)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="pallas", help="pallas | pallas_tpu | pallas_gpu")
    ap.add_argument("--interpret", action="store_true", help="run the kernels in Pallas interpret mode")
    args = ap.parse_args(argv)
    interpret = args.interpret or not on_accelerator()
    print(f"device: {chip()[0]} ({jax.default_backend()}), impl={args.impl}, interpret={interpret}")
    return args.impl, interpret
