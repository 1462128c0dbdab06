"""GLM-5.2 serving capacity on v5p: KV-cache tokens per chip and the requests a topology holds at once.

    .venv/bin/python -m benchmarks.kv_capacity [--reserve 0.10]

For each topology and serving mesh (tensor 4 x expert n, the engine's rules: routed experts split over all
chips, everything else over tensor, `glmjax.serve.engine.serve_rules`), the bf16 weights one chip holds are
computed from the model's abstract parameters and their shardings (no compile). What is left of the chip's
HBM after the weights and a reserve (--reserve of HBM, default 10%: the decode step's temporaries were
1.1-1.4 GiB of 95.74 in the compiled steps, docs/serving.md) holds KV cache. The cache bytes per token
come from `glmjax.serve.kv_cache.cache_shapes`, in the TPU layouts: bf16 rows stored 640 wide, or FP8 rows
(512 fp8 values packed in uint32 + a float32 scale + the 64 rope values in a 128-lane bf16 tail; int8
indexer keys packed four positions per uint32 word + a float32 scale), with IndexShare's indexer keys on
the 21 full layers + MTP, or (for comparison) on all 78 + MTP.

A tensor group's chips hold the same rows (MLA's one latent row serves every head), so a topology holds
(chips / tensor) x tokens-per-chip tokens of cache, in slots or sequence shards as the mesh splits them.
Concurrency = that / context length (rounded down; the engine also needs the slots to divide over its
batch axes).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import benchmarks.tpu_aot  # noqa: F401  (libtpu environment, before jax first touches libtpu)
import glmjax
from glmjax.serve.compile_only import serve_options
from glmjax.serve.engine import SERVE_RULES
from glmjax.serve.kv_cache import bytes_per_token
from glmjax.sharding import make_mesh, param_shardings
from glmjax.train.checkpointing import with_shardings
from glmjax.train.compile_only import HBM_GIB, shard_bytes

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
MESHES = [("v5p:2x2x4", {"tensor": 4, "expert": 4}), ("v5p:4x4x2", {"tensor": 4, "expert": 8}),
          ("v5p:4x4x4", {"tensor": 4, "expert": 16}), ("v5p:8x4x4", {"tensor": 4, "expert": 32}),
          ("v5p:8x8x4", {"tensor": 4, "expert": 64})]
LENGTHS = {"128K": 131072, "256K": 262144, "1M": 1048576}


def weight_bytes(cfg, topology: str, mesh_shape: dict) -> tuple[int, str]:
    """bf16 weight bytes per chip under the serving rules -> (bytes, device kind)."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = make_mesh(mesh_shape, devices)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        model = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, serve_options(jnp.bfloat16), rngs=nnx.Rngs(0)))
    params = nnx.state(model)
    return shard_bytes(with_shardings(params, param_shardings(model, mesh, SERVE_RULES))), devices[0].device_kind


def formats(cfg) -> dict[str, int]:
    """Cache bytes per token in the TPU layouts: bf16 (640 wide) and FP8, with IndexShare and with an indexer on
    every layer."""
    every = cfg.replace(indexer_types=None, index_topk_pattern="F" * cfg.num_hidden_layers)
    out = {}
    for name, c in [("", cfg), (" no IndexShare", every)]:
        out["bf16" + name] = bytes_per_token(c, mtp=True, lane_padded=True)
        out["fp8" + name] = bytes_per_token(c, mtp=True, quant="fp8", lane_padded=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reserve", type=float, default=0.10, help="fraction of HBM kept for temporaries")
    args = ap.parse_args()
    cfg = glmjax.load_config(REPO / "configs" / "glm-5.2.json")
    per_token = formats(cfg)
    print("GLM-5.2 KV bytes per token: " + ", ".join(f"{k} {v:,}" for k, v in per_token.items()))
    head = ["topology", "mesh", "weights/chip", "KV budget/chip"] + [f"tokens/chip {k}" for k in per_token]
    head += [f"{fmt} requests at {n}" for fmt in ("bf16", "fp8") for n in LENGTHS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for topology, shape in MESHES:
        weights, kind = weight_bytes(cfg, topology, shape)
        chips = math.prod(shape.values())
        budget = max(0.0, HBM_GIB[kind] * GiB * (1 - args.reserve) - weights)
        tokens = {k: int(budget // v) for k, v in per_token.items()}
        groups = chips // shape["tensor"]
        row = [topology, " x ".join(f"{a} {n}" for a, n in shape.items()), f"{weights / GiB:.1f} GiB",
               f"{budget / GiB:.1f} GiB"] + [f"{t / 1e3:,.0f}K" for t in tokens.values()]
        row += [str(groups * tokens[fmt] // n) for fmt in ("bf16", "fp8") for n in LENGTHS.values()]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
