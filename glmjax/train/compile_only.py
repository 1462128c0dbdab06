"""`train.py --compile-only`: the real train step compiled ahead of time for a TPU topology, from any host.

The step is the one `Trainer` runs (objective, gradients, optax update of the float32 masters, router bias
update), lowered with abstract model and optimizer states placed by the rules on a mesh over the named
topology's chips, and compiled by the TPU compiler (libtpu; Pallas Mosaic kernels included). Model and
optimizer states are donated, as in training, so the report's total is what one chip holds at the step's
peak: parameters + optimizer state + the step's temporaries (activations, gradients, gathered weights).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from glmjax.errors import ConfigError
from glmjax.model.transformer import GlmMoeDsa
from glmjax.sharding import MODEL_VARIABLES, logical_to_spec, make_mesh, param_shardings
from glmjax.train.checkpointing import with_shardings
from glmjax.train.config import TrainConfig
from glmjax.train.optimizer import build_optimizer, optimizer_shardings
from glmjax.train.trainer import model_config, model_options, train_step_fn

GiB = 2**30
# HBM per chip by device kind (GiB): the budget the report compares against.
HBM_GIB = {"TPU v5p": 95.74, "TPU v5": 95.74, "TPU v6e": 31.25, "TPU v6 lite": 31.25, "TPU v5e": 15.75,
           "TPU v5 lite": 15.75, "TPU v4": 32.0}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    chips: int
    device_kind: str
    hbm_bytes: float | None
    param_bytes: int  # per chip
    optimizer_bytes: int  # per chip
    batch_bytes: int  # per chip
    temp_bytes: int
    total_bytes: int
    flops: float
    tokens: int
    mosaic_kernels: int
    compile_seconds: float

    def table(self) -> str:
        rows = [("parameters (float32 masters)", self.param_bytes), ("optimizer state", self.optimizer_bytes),
                ("batch", self.batch_bytes), ("temporaries (activations, gradients, gathers)", self.temp_bytes),
                ("total per chip", self.total_bytes)]
        lines = [f"{self.topology}: {self.chips} chips ({self.device_kind})"]
        lines += [f"  {k:<48s} {v / GiB:9.2f} GiB" for k, v in rows]
        if self.hbm_bytes:
            free = 1 - self.total_bytes / self.hbm_bytes
            lines.append(f"  {'HBM per chip':<48s} {self.hbm_bytes / GiB:9.2f} GiB  ({100 * free:.1f}% headroom)")
        lines.append(f"  compiled FLOPs per chip {self.flops:.3e} (XLA counts each scanned loop body once); "
                     f"{self.tokens:,} tokens per step")
        lines.append(f"  Mosaic kernels in the program: {self.mosaic_kernels}; "
                     f"compiled in {self.compile_seconds:.0f} s")
        return "\n".join(lines)


def shard_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays carrying NamedShardings (the largest per-device share)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def compile_and_measure(jitted, mesh, *args):
    """jitted lowered with abstract `args` under `mesh` and compiled -> (Compiled, seconds, its per-chip
    memory_analysis(), its per-chip FLOPs from cost_analysis())."""
    t0 = time.perf_counter()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled, seconds, compiled.memory_analysis(), float(cost.get("flops", 0.0))


def compile_train_step(cfg: TrainConfig, topology: str) -> CompileReport:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    n = math.prod(cfg.mesh.values()) if cfg.mesh else 1
    if n != len(devices):
        raise ConfigError(f"mesh: {dict(cfg.mesh)} has {n} devices; topology {topology} has {len(devices)}")
    mesh = make_mesh(cfg.mesh, devices)
    mc = model_config(cfg, None)
    opts = model_options(cfg)
    stage = cfg.run.stage
    tx, wrt = build_optimizer(cfg.optimizer, stage)

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        model = nnx.eval_shape(lambda: GlmMoeDsa(mc, opts, rngs=nnx.Rngs(0)))
        optimizer = nnx.eval_shape(lambda: nnx.Optimizer(model, tx, wrt=wrt))
    model_graph, model_state, rng_state = nnx.split(model, MODEL_VARIABLES, ...)
    opt_graph, opt_state = nnx.split(optimizer)
    m_shard = param_shardings(model, mesh)
    o_shard = optimizer_shardings(opt_state, mesh)

    model_sd, opt_sd = with_shardings(model_state, m_shard), with_shardings(opt_state, o_shard)
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    spec = logical_to_spec(("batch", None), (B, T), mesh=mesh, what="batch")
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, spec))
    batch_sd = {"input_ids": tok, "segment_ids": tok}
    step = train_step_fn(cfg.loss, stage, cfg.optimizer)

    def pure(model_state, opt_state, batch):
        m = nnx.merge(model_graph, model_state, rng_state)
        o = nnx.merge(opt_graph, opt_state)
        metrics, _ = step(m, o, batch)
        return nnx.state(m, MODEL_VARIABLES), nnx.state(o), metrics

    jitted = jax.jit(pure, donate_argnums=(0, 1), out_shardings=(m_shard, o_shard, None))
    compiled, seconds, ma, flops = compile_and_measure(jitted, mesh, model_sd, opt_sd, batch_sd)
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    params, opt_bytes, batch_bytes = shard_bytes(model_sd), shard_bytes(opt_sd), shard_bytes(batch_sd)
    total = int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                - ma.alias_size_in_bytes)
    return CompileReport(topology=topology, chips=len(devices), device_kind=kind,
                         hbm_bytes=None if hbm is None else hbm * GiB, param_bytes=params, optimizer_bytes=opt_bytes,
                         batch_bytes=batch_bytes, temp_bytes=int(ma.temp_size_in_bytes), total_bytes=total,
                         flops=flops, tokens=B * T,
                         mosaic_kernels=compiled.as_text().count("tpu_custom_call"), compile_seconds=seconds)

