"""Ahead-of-time TPU compile of a GLM-MoE-DSA training step (forward + backward of LM + MTP cross-entropy).

    python -m benchmarks.aot_train_step                                   # GLM-5.2, 128K x 16, v5p:8x8x4
    python -m benchmarks.aot_train_step --topology v5p:2x2x1 --mesh tensor=4 --layers 2 --experts 16 \\
        --seq 4096 --batch 4

Runs on a CPU host with libtpu (the `test` extra): the step is lowered for the named TPU topology under a mesh
over its devices and compiled by the real TPU compiler, Pallas Mosaic kernels included. It prints per-chip
argument, temporary and total memory and the compiled FLOPs against the analytic count. The step takes bf16
parameters and returns the loss and bf16 gradients; the optimizer state (fp32 master weights and AdamW
moments, 12 bytes per parameter) is the training loop's and is reported beside it, not compiled here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import benchmarks.tpu_aot  # noqa: E402,F401  (libtpu environment, before jax starts)
import glmjax  # noqa: E402
from glmjax.model.context import to_model_order  # noqa: E402
from glmjax.sharding import logical_to_spec, make_mesh, param_sharding  # noqa: E402
from glmjax.train.compile_only import compile_and_measure  # noqa: E402
from glmjax.train.losses import chunked_cross_entropy  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class StepReport:
    chips: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    # per chip, from the compiler (Pallas kernels through their CostEstimate). XLA's cost analysis counts the
    # body of a loop once, so for a model whose segments scan several groups it is far below the real count.
    flops: float
    analytic_flops: float  # per chip: 6 x active parameters per token, plus sparse attention and the indexer
    mosaic_kernels: int  # tpu_custom_call ops in the compiled program
    params: int
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes

    def table(self) -> str:
        opt = self.params * 12 / self.chips  # fp32 master + two AdamW moments
        rows = [("arguments (bf16 params, tokens)", self.argument_bytes), ("temporaries", self.temp_bytes),
                ("outputs (bf16 grads, loss)", self.output_bytes), ("total compiled", self.total_bytes),
                ("+ optimizer state (fp32 master, AdamW m, v)", opt), ("= step + optimizer", self.total_bytes + opt)]
        lines = [f"  {k:<46s} {v / GiB:9.2f} GiB" for k, v in rows]
        lines.append(f"  FLOPs per chip: compiled {self.flops:.3e} (each scanned loop body once), analytic "
                     f"{self.analytic_flops:.3e} (ratio {self.flops / self.analytic_flops:.2f})")
        lines.append(f"  Mosaic kernels in the program: {self.mosaic_kernels}; compile {self.compile_seconds:.0f} s")
        return "\n".join(lines)


def analytic_flops(cfg: glmjax.GlmMoeDsaConfig, tokens: int, T: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the whole step, all chips together."""
    D, V = cfg.hidden_size, cfg.vocab_size
    total = cfg.num_parameters()
    E, k, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    n_moe = sum(m == "sparse" for m in cfg.mlp_schedule) + cfg.num_nextn_predict_layers
    inactive = n_moe * (E - k) * 3 * D * I
    embed = V * D  # a lookup, not a matmul
    active_matmul = total - inactive - embed
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    K = min(cfg.index_topk, T)
    r, p, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    attention = n_layers * 2 * H * K * (2 * r + p)  # scores over r+p, values over r, per token
    full = cfg.num_full_indexer_layers + cfg.num_nextn_predict_layers
    indexer = full * 2 * cfg.index_n_heads * cfg.index_head_dim * (T / 2)  # causal: T/2 keys on average
    # The indexer is trained by its own loss only when enabled; its scores are forward-only here.
    return tokens * (6 * active_matmul + 3 * attention + indexer)


def compile_train_step(cfg: glmjax.GlmMoeDsaConfig, *, topology: str, mesh_shape: dict[str, int], batch: int,
                       seq: int, options: glmjax.ModelOptions, loss_chunk: int = 2048, mtp_weight: float = 0.3,
                       backward: bool = True) -> tuple[object, StepReport]:
    """Compiles the step (or, with backward=False, the loss alone) on the first prod(mesh_shape) chips of
    `topology`; returns the Compiled object and its per-chip report."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    devices = devices[:int(np.prod(list(mesh_shape.values()) or [1]))]
    mesh = make_mesh(mesh_shape, devices=devices)
    model = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, options, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def placed(state):  # abstract arrays carrying each variable's sharding by its logical axes
        return jax.tree.map(
            lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(v, mesh))),
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    params_sd, rest_sd = placed(params), placed(rest)
    ids_sd = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                                  sharding=NamedSharding(mesh, logical_to_spec(("batch", "seq"), (batch, seq),
                                                                               mesh=mesh, what="input_ids")))

    def loss_fn(params, rest, ids):
        m = nnx.merge(graphdef, params, rest)
        out = m.backbone(ids)
        cp = m.context_size()
        labels = to_model_order(jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1), cp)
        w = to_model_order(jnp.broadcast_to(jnp.arange(seq) < seq - 1, ids.shape).astype(jnp.float32), cp)
        lm, n = chunked_cross_entropy(m.head, out.hidden, labels, w, chunk=loss_chunk)
        loss = lm / n
        for s, mtp_hidden in enumerate(out.mtp_hidden):
            labels2 = to_model_order(jnp.concatenate([ids[:, 2 + s:], ids[:, :2 + s]], axis=1), cp)
            w2 = to_model_order(jnp.broadcast_to(jnp.arange(seq) < seq - 2 - s, ids.shape).astype(jnp.float32), cp)
            mtp, n2 = chunked_cross_entropy(m.head, mtp_hidden, labels2, w2, chunk=loss_chunk)
            loss = loss + mtp_weight * mtp / n2
        return loss

    if backward:
        step = jax.jit(jax.value_and_grad(loss_fn),
                       out_shardings=(None, jax.tree.map(lambda x: x.sharding, params_sd)))
    else:
        step = jax.jit(loss_fn)
    compiled, seconds, ma, flops = compile_and_measure(step, mesh, params_sd, rest_sd, ids_sd)
    chips = len(devices)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    report = StepReport(
        chips=chips, argument_bytes=int(ma.argument_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes), flops=flops,
        analytic_flops=analytic_flops(cfg, batch * seq, seq) / chips / (1 if backward else 3),
        mosaic_kernels=compiled.as_text().count("tpu_custom_call"), params=n_params, compile_seconds=seconds)
    return compiled, report


def parse_mesh(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/glm-5.2.json")
    ap.add_argument("--topology", default="v5p:8x8x4")
    ap.add_argument("--mesh", default="fsdp=16,context=4,expert=4", help="axis=size,...; the rest are 1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: the config's)")
    ap.add_argument("--experts", type=int, default=None, help="fewer routed experts (default: the config's)")
    ap.add_argument("--impl", default="pallas_tpu", choices=["reference", "pallas_tpu"])
    ap.add_argument("--remat", default="nothing", choices=["none", "nothing", "layer_input", "attention"])
    ap.add_argument("--q-block", type=int, default=128)
    ap.add_argument("--moe-capacity", type=float, default=0.625,
                    help="MoE exchange slots per round, in multiples of uniform routing (more skew: more rounds)")
    args = ap.parse_args()

    cfg = glmjax.load_config(args.config)
    changes = {}
    if args.layers is not None:
        changes.update(num_hidden_layers=args.layers, index_topk_pattern=None)
    if args.experts is not None:
        changes.update(n_routed_experts=args.experts, n_group=1, topk_group=1)
    if changes:
        cfg = cfg.replace(**changes)
    opts = glmjax.ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=args.impl,
                               q_block=args.q_block, remat=args.remat, moe_gmm_impl="megablox",
                               moe_capacity_factor=args.moe_capacity)
    mesh = parse_mesh(args.mesh)
    print(f"{args.config}: {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, "
          f"{cfg.n_routed_experts} experts; {args.batch} x {args.seq} tokens; {args.topology} mesh {mesh}; "
          f"impl {args.impl}, remat {args.remat}, q_block {args.q_block}, MoE capacity {args.moe_capacity}")
    _, report = compile_train_step(cfg, topology=args.topology, mesh_shape=mesh, batch=args.batch, seq=args.seq,
                                   options=opts)
    print(f"per chip ({report.chips} chips, {report.params / 1e9:.1f}B parameters):")
    print(report.table())


if __name__ == "__main__":
    main()
