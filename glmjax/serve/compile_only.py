"""`serve.py --compile-only`: the serving engine's device programs compiled ahead of time for a TPU topology.

The program is the one `Engine` runs (`glmjax.serve.engine.jit_program` over `glmjax.serve.steps`): by default one
speculative step (verify k drafts per slot in one target forward over the KV cache, accept, roll back by
lengths, draft the next k with the MTP layer), or plain decoding (k = 0), or one prefill chunk. It is lowered
with an abstract model (bf16 weights placed by the rules), an abstract lane-padded bf16 cache and slot state
placed like the engine places them (`slot_shardings`), and compiled by the TPU compiler (libtpu; Pallas
Mosaic kernels included) on a mesh over the named topology's chips. Cache and slot state are donated, as in
the engine, so the report's total is what one chip holds at the step's peak: weights + cache + slot state +
the step's temporaries (+ the few output bytes that do not alias an input).

The caller sets up libtpu before jax first touches it (`import benchmarks.tpu_aot`, or
ALLOW_MULTIPLE_LIBTPU_LOAD=1 and JAX_PLATFORMS=cpu as `train.py --compile-only` does):

    report = compile_serve_step(glmjax.load_config("configs/glm-5.2.json"), "v5p:4x4x4",
                                {"tensor": 4, "expert": 16}, slots=64, max_len=131072, k=3)
    print(report.table())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glmjax.config import GlmMoeDsaConfig
from glmjax.errors import ConfigError
from glmjax.model.options import ModelOptions
from glmjax.model.transformer import GlmMoeDsa
from glmjax.serve import steps
from glmjax.serve.engine import SERVE_RULES, index_key_dtype, jit_program, prefill_rows, slot_shardings
from glmjax.serve.kv_cache import Quant, cache_shapes, check_split
from glmjax.serve.sampling import SamplingArrays
from glmjax.sharding import (
    logical_rules,
    make_mesh,
    mesh_axes,
    mesh_size,
    param_shardings,
)
from glmjax.train.checkpointing import with_shardings
from glmjax.train.compile_only import HBM_GIB, compile_and_measure, shard_bytes

GiB = 2**30
Program = Literal["speculative", "prefill"]


@dataclasses.dataclass(frozen=True)
class ServeCompileReport:
    """Per-chip memory and cost of one compiled serving program.

    program: "speculative" (k >= 1), "decode" (k = 0) or "prefill" (one chunk of one request); slot_split:
    devices the slots are split over (the mesh's batch axes); tokens: target-forward tokens per call (slots x
    (k + 1), or the prefill chunk). Byte counts are per chip: weights (bf16 parameters as placed by the
    rules), cache ([G, L, slots / slot_split, max_len / seq_split, 640] latents, indexer keys, the MTP
    layer's; seq_split: devices every slot's sequence is split over, the rules' "kv_seq" axes; kv_quant
    "fp8": the FP8 layout of glmjax.serve.kv_cache; page_size: a paged cache of num_pages pages instead, its
    pools split like the slots, plus the page table), state
    (SlotState), temporaries (the compiler's temp_size), outputs (those that alias no donated input: the
    tokens); aliased_bytes: the donated input bytes the outputs reuse (>= cache + state when the donation
    took). total_bytes is what the chip holds at the step's peak: weights + cache + state + temporaries +
    outputs. (Not the compiler's argument size: jit drops unused arguments, e.g. the MTP weights of a k = 0
    decode step, which the engine holds all the same.)"""

    program: str
    topology: str
    chips: int
    device_kind: str
    mesh: tuple[tuple[str, int], ...]
    slots: int
    slot_split: int
    seq_split: int
    max_len: int
    kv_quant: str
    page_size: int | None
    num_pages: int | None
    k: int
    tokens: int
    hbm_bytes: float | None
    weight_bytes: int
    cache_bytes: int
    state_bytes: int
    temp_bytes: int
    output_bytes: int
    aliased_bytes: int
    flops: float
    mosaic_kernels: int
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.state_bytes + self.temp_bytes + self.output_bytes

    def table(self) -> str:
        mesh = " x ".join(f"{a} {n}" for a, n in self.mesh) or "one chip"
        what = {"speculative": f"verify {self.k} drafts + draft {self.k}", "decode": "one token",
                "prefill": f"{self.tokens}-token prefill chunks"}[self.program]
        fmt = "fp8" if self.kv_quant == "fp8" else "bf16"
        if self.page_size:
            held = (f"KV cache, {fmt}, paged ({self.num_pages // (self.slot_split * self.seq_split):,} of "
                    f"{self.num_pages:,} pages of {self.page_size} tokens + table)")
        else:
            held = (f"KV cache, {fmt} ({self.slots // self.slot_split} of {self.slots} slots x "
                    f"{self.max_len // self.seq_split:,} of {self.max_len:,} tokens)")
        rows = [("weights (bf16)", self.weight_bytes), (held, self.cache_bytes),
                ("slot state", self.state_bytes), ("temporaries", self.temp_bytes),
                ("outputs (tokens)", self.output_bytes), ("total per chip", self.total_bytes)]
        lines = [f"{self.topology}: {self.chips} chips ({self.device_kind}), mesh {mesh}; "
                 f"{self.program} step ({what})"]
        lines += [f"  {k:<64s} {v / GiB:9.2f} GiB" for k, v in rows]
        if self.hbm_bytes:
            free = 1 - self.total_bytes / self.hbm_bytes
            lines.append(f"  {'HBM per chip':<64s} {self.hbm_bytes / GiB:9.2f} GiB  ({100 * free:.1f}% headroom)")
        donated = self.cache_bytes + self.state_bytes
        lines.append(f"  cache and state updated in place: {'yes' if self.aliased_bytes >= donated else 'NO'} "
                     f"({self.aliased_bytes / GiB:.2f} of {donated / GiB:.2f} GiB aliased)")
        lines.append(f"  compiled FLOPs per chip {self.flops:.3e} (XLA counts each scanned loop body once); "
                     f"{self.tokens:,} target tokens per step")
        lines.append(f"  Mosaic kernels in the program: {self.mosaic_kernels}; "
                     f"compiled in {self.compile_seconds:.0f} s")
        return "\n".join(lines)


def serve_options(dtype=jnp.bfloat16, scan_layers: bool = False) -> ModelOptions:
    """The model options of TPU serving: bf16 weights and activations, Pallas Mosaic DSA kernels (so the
    cache is stored lane-padded, 640 wide), megablox experts, no remat (no backward), unscanned layers
    (ModelOptions.scan_layers)."""
    return ModelOptions(dtype=dtype, param_dtype=dtype, attention_impl="pallas_tpu", interpret=False,
                        moe_gmm_impl="megablox", remat="none", scan_layers=scan_layers)


def compile_serve_step(config: GlmMoeDsaConfig, topology: str, mesh_shape: Mapping[str, int], *, slots: int,
                       max_len: int, k: int, dtype=jnp.bfloat16, program: Program = "speculative",
                       prefill_chunk: int = 4096, prefill_batch: int = 1,
                       rules: Mapping[str, tuple[str, ...]] = SERVE_RULES,
                       scan_layers: bool = False, kv_quant: Quant = "none", page_size: int | None = None,
                       num_pages: int | None = None) -> ServeCompileReport:
    """Compiles one serving step of `config` for every chip of `topology` (e.g. "v5p:4x4x4") under a mesh of
    `mesh_shape` (e.g. {"tensor": 4, "expert": 16}; its sizes must multiply to the topology's chips).

    program "speculative": the engine's per-step program for slots sequences of up to max_len tokens with k
    greedy MTP drafts (k = 0: plain decoding, steps.decode); "prefill": one prefill_chunk-token chunk of each
    of prefill_batch requests, in the engine's largest call for it (the next power of two of rows; steps.prefill,
    with the MTP rows and k drafts when k >= 1). The cache is [.., slots, max_len, 640]
    bf16 (the TPU kernels' lane-padded width) plus the MTP layer's when k >= 1. rules: the logical-axis rules
    the weights are placed and the program traced by (the engine's SERVE_RULES by default, the cache split
    over context; engine.serve_rules(("context", "expert")) splits it over expert too; DEFAULT_RULES would
    FSDP-split the non-expert weights over expert and all-gather them every step). scan_layers: see
    ModelOptions (the engine serves unscanned layers). kv_quant "fp8": the FP8 cache (int8 indexer keys for the
    TPU kernels; glmjax.serve.kv_cache). page_size: a paged cache (glmjax.serve.kv_cache) of num_pages pages
    (default slots x max_len / page_size), its pools split over the slot groups and sequence shards like the
    engine's. -> ServeCompileReport."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    n = math.prod(mesh_shape.values()) if mesh_shape else 1
    if n != len(devices):
        raise ConfigError(f"mesh: {dict(mesh_shape)} has {n} devices; topology {topology} has {len(devices)}")
    if k < 0:
        raise ConfigError(f"k: must be >= 0, got {k}")
    mesh = make_mesh(mesh_shape, devices)
    with logical_rules(rules):
        batch_axes, seq_axes = mesh_axes("batch", mesh), mesh_axes("kv_seq", mesh)
    split, seq_split = mesh_size(batch_axes, mesh), mesh_size(seq_axes, mesh)
    if page_size is not None:
        num_pages = num_pages or slots * max_len // page_size
    check_split(config, slots=slots, max_len=max_len, quant=kv_quant, lane_padded=True, page_size=page_size,
                num_pages=num_pages, slot_axes=batch_axes, slot_split=split, seq_axes=seq_axes, seq_split=seq_split,
                error=ConfigError)

    options = serve_options(dtype, scan_layers)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        model = nnx.eval_shape(lambda: GlmMoeDsa(config, options, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    params_sd = with_shardings(params, param_shardings(model, mesh, rules))

    cache = cache_shapes(config, slots, max_len, mtp=bool(k), dtype=dtype, lane_padded=True,
                         scan_layers=scan_layers, quant=kv_quant, key_dtype=index_key_dtype(options),
                         page_size=page_size, num_pages=num_pages)
    state = jax.eval_shape(lambda: steps.init_state(slots, k, config.vocab_size, False))
    with logical_rules(rules):
        cache_sh, state_sh = slot_shardings(cache, state, mesh, rules)
    cache_sd, state_sd = with_shardings(cache, cache_sh), with_shardings(state, state_sh)

    replicated = NamedSharding(mesh, PartitionSpec())
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=replicated)  # noqa: E731
    trace_rules = rules
    if program == "speculative":
        name = "speculative" if k else "decode"
        static = dict(k=k, sampled_drafts=False) if k else {}
        args = (arg((slots,), jnp.bool_),)  # active
        tokens = slots * (k + 1)
    elif program == "prefill":
        rows = prefill_rows(prefill_batch)
        name, static, tokens = "prefill", dict(k=k, sampled_drafts=False), rows * prefill_chunk
        per_row = arg((rows,), jnp.int32)
        sampling = SamplingArrays(arg((rows,), jnp.float32), per_row, arg((rows,), jnp.float32),
                                  arg((rows, 2), jnp.uint32))
        # slots, tokens, next_tokens, start, count, last, sampling: a chunk of each request
        args = (per_row, arg((rows, prefill_chunk), jnp.int32), arg((rows, prefill_chunk), jnp.int32), per_row,
                per_row, arg((rows,), jnp.bool_), sampling)
        trace_rules = {**rules, "batch": ()}  # as Engine._call: a prefill call's requests are not split
    else:
        raise ConfigError(f"program: {program!r} is not 'speculative' or 'prefill'")

    with logical_rules(trace_rules):
        leaves, tree = jax.tree.flatten(params_sd)
        compiled, seconds, ma, flops = compile_and_measure(jit_program(graphdef, tree, name, static), mesh, leaves,
                                                           cache_sd, state_sd, *args)
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    return ServeCompileReport(
        program=name, topology=topology, chips=len(devices), device_kind=kind,
        mesh=tuple((a, int(s)) for a, s in mesh.shape.items() if s > 1), slots=slots, slot_split=split,
        seq_split=seq_split, max_len=max_len, kv_quant=kv_quant, page_size=page_size,
        num_pages=num_pages if page_size is not None else None, k=k, tokens=tokens,
        hbm_bytes=None if hbm is None else hbm * GiB,
        weight_bytes=shard_bytes(params_sd), cache_bytes=shard_bytes(cache_sd), state_bytes=shard_bytes(state_sd),
        temp_bytes=int(ma.temp_size_in_bytes), aliased_bytes=int(ma.alias_size_in_bytes),
        output_bytes=max(0, int(ma.output_size_in_bytes - ma.alias_size_in_bytes)), flops=flops,
        mosaic_kernels=compiled.as_text().count("tpu_custom_call"), compile_seconds=seconds)
