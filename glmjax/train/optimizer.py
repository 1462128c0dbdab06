"""The training optimizer: AdamW or Muon, the learning-rate schedule, the weight-decay mask, the parameters
each training stage trains, global-norm clipping, gradient accumulation and the optimizer state's sharding.

Master weights. Train with `ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32)`: every layer keeps
its stored weight in param_dtype and casts it to the compute dtype where it is used (`Linear`, `Embed`,
the routed experts' grouped matmuls and MLA's absorbed kv_b_proj cast to `dtype`; the norms scale in
float32; the router computes in float32). Gradients therefore arrive in float32, one per float32 weight,
and the optimizer updates float32 masters; no separate master copy exists or is needed.
`create_optimizer` warns when a trainable parameter is stored in another dtype.

The optimizer only ever sees `nnx.Param`s of the stage's trainable set (`trainable_filter`): the router's
`RouterBias` (aux-loss-free balancing, updated by the balancer) is not a Param, and frozen parameters get
neither gradients nor optimizer state (they are simply not in `wrt`).

Per-parameter rules, decided from the parameter's path and shape alone (see `param_rule`), because optax
sees plain arrays at update time:
- Stacked parameters: everything under `stacks` (decoder.LayerStack) has one leading "layers" dim (the
  scanned groups); the rest of the shape is the per-layer tensor.
- Weight decay: iff the per-layer tensor has 2 or more dims (a matrix, expert stack or per-head
  projection). This excludes every norm weight and bias (all 1-D here) and any other vector.
- Muon (name="muon"): every per-layer matrix except the token embedding and lm_head, orthogonalised one
  slice at a time: leading layer, expert and head dims are batch dims; the last two dims are (in, out),
  except for the per-head input projections [in, heads, head_dim] (q_b_proj, kv_b_proj, the indexer's
  wq_b), whose (in, out) are dims -3 and -1. AdamW takes the rest (embedding, lm_head, vectors).

Gradient accumulation is this module's own loop (`accumulate_gradients`), not optax.MultiSteps: the
micro-batches run in a `lax.scan` inside the one jitted train step, gradients are summed in float32 and
divided by the total loss weight (token count), so k micro-batches give the gradient of the full batch's
token-mean loss even when the micro-batches hold different numbers of tokens (MultiSteps would average
micro-batch means with equal weight) and no accumulator lives in the optimizer state or checkpoint. The
train step calls the optimizer's `update` once per optimizer step, never per micro-batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.transforms import MaskedNode

from glmjax.errors import ConfigError
from glmjax.sharding import param_sharding
from glmjax.train.sections import from_mapping

OptimizerName = Literal["adamw", "muon"]
ScheduleName = Literal["cosine", "wsd"]
DecayShape = Literal["linear", "cosine"]
MomentDtype = Literal["float32", "bfloat16"]
# dense_warmup: only the DSA indexers learn (their KL loss against the dense attention); sparse and full:
# everything.
Stage = Literal["dense_warmup", "sparse", "full"]
STAGES: tuple[str, ...] = ("dense_warmup", "sparse", "full")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How parameters are updated. Steps count optimizer updates (not micro-batches).

    name: "adamw", or "muon" (Muon on matrices, AdamW on the rest; module docstring). peak_lr: the
    schedule's top; min_lr_ratio: its floor as a fraction of peak_lr. b1, b2, eps: AdamW's. weight_decay:
    decoupled, multiplied by the learning rate (optax / PyTorch convention), matrices only.
    schedule: "cosine" (linear warmup, cosine to the floor at total_steps) or "wsd" (warmup, constant
    peak, then a `decay_shape` decay to the floor over the last decay_fraction of total_steps).
    clip_norm: global-norm clip of the (accumulated) gradient; None disables clipping (the norm is still
    recorded). grad_accum_steps: micro-batches per optimizer step (`accumulate_gradients`).
    moment_dtype: storage of the moments (AdamW's both, Muon's momentum); "bfloat16" halves the state, as
    DeepSeek-V3 does; the arithmetic stays float32. muon_beta, muon_ns_steps: Muon's momentum and
    Newton-Schulz iterations. muon_consistent_rms: Muon updates scaled to this RMS (0.2, "Muon is
    scalable": the same peak_lr and weight_decay then suit Muon and AdamW parameters); None uses
    Keller Jordan's sqrt(max(1, fan_out / fan_in)) instead."""

    name: OptimizerName = "adamw"
    peak_lr: float = 3e-4
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: ScheduleName = "cosine"
    decay_fraction: float = 0.1
    decay_shape: DecayShape = "linear"
    warmup_steps: int = 2000
    total_steps: int = 100_000
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    moment_dtype: MomentDtype = "float32"
    muon_beta: float = 0.95
    muon_ns_steps: int = 5
    muon_consistent_rms: float | None = 0.2

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ConfigError(f"OptimizerConfig.{field}: {why}, got {getattr(self, field)!r}")

        choices = dict(name=("adamw", "muon"), schedule=("cosine", "wsd"), decay_shape=("linear", "cosine"),
                       moment_dtype=("float32", "bfloat16"))
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                bad(field, f"must be one of {allowed}")
        for field in ("peak_lr", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "decay_fraction",
                      "clip_norm", "muon_beta", "muon_consistent_rms"):
            v = getattr(self, field)
            if v is None and field in ("clip_norm", "muon_consistent_rms"):
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                bad(field, "must be a finite number")
        for field in ("warmup_steps", "total_steps", "grad_accum_steps", "muon_ns_steps"):
            if isinstance(getattr(self, field), bool) or not isinstance(getattr(self, field), int):
                bad(field, "must be an integer")
        if not self.peak_lr > 0:
            bad("peak_lr", "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        for field in ("b1", "b2", "muon_beta"):
            if not 0 <= getattr(self, field) < 1:
                bad(field, "must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be positive")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            bad("clip_norm", "must be positive or None")
        if self.muon_consistent_rms is not None and not self.muon_consistent_rms > 0:
            bad("muon_consistent_rms", "must be positive or None")
        if self.total_steps < 1:
            bad("total_steps", "must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            bad("warmup_steps", f"must be in [0, total_steps={self.total_steps}]")
        if self.grad_accum_steps < 1:
            bad("grad_accum_steps", "must be >= 1")
        if self.muon_ns_steps < 1:
            bad("muon_ns_steps", "must be >= 1")
        if self.schedule == "wsd":
            if not 0 < self.decay_fraction <= 1:
                bad("decay_fraction", "must be in (0, 1]")
            if self.warmup_steps + self.decay_steps > self.total_steps:
                bad("decay_fraction", f"its {self.decay_steps} decay steps and the {self.warmup_steps} warmup "
                    f"steps exceed total_steps={self.total_steps}")

    @property
    def decay_steps(self) -> int:
        """Length of the WSD decay phase: the last decay_fraction of total_steps (at least 1 step)."""
        return max(1, round(self.decay_fraction * self.total_steps))

    @property
    def moment_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.moment_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimizerConfig:
        """From a config file's mapping; an unknown or missing field is an error naming it."""
        return from_mapping(cls, values)


# --------------------------------------------------------------------------------------------- schedule


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate of update `step` (0-based).

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps, so the first update already moves
    and update warmup_steps - 1 runs at peak. Then "cosine": from peak at warmup_steps to peak *
    min_lr_ratio at total_steps; "wsd": peak until total_steps - decay_steps, then linear or cosine
    down to the floor at total_steps. After total_steps: the floor."""
    peak, floor = cfg.peak_lr, cfg.peak_lr * cfg.min_lr_ratio
    warm, total = cfg.warmup_steps, cfg.total_steps
    decay_start = warm if cfg.schedule == "cosine" else total - cfg.decay_steps
    shape = "cosine" if cfg.schedule == "cosine" else cfg.decay_shape

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        ramp = peak * jnp.minimum(1.0, (s + 1) / max(warm, 1))
        p = jnp.clip((s - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
        if shape == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * p))
        else:
            decayed = peak + (floor - peak) * p
        return jnp.where(s < warm, ramp, decayed)

    return schedule


# ------------------------------------------------------------------------------------ per-parameter rules

# The per-head input projections [in, heads, head_dim]: their heads dim sits between in and out.
PER_HEAD_INPUT = frozenset({"q_b_proj", "kv_b_proj", "wq_b"})
# Matrices that Muon leaves to AdamW: lookups and the output head, whose rows are not a linear map's.
ADAMW_MATRICES = frozenset({"embed_tokens", "lm_head"})


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """How one parameter is optimised. layer_dims: leading stacked dims; optimizer: "muon" | "adamw";
    decay: weight decay applies; muon_dims: Muon's (in, out) dims (others are batch), None for AdamW."""

    layer_dims: int
    optimizer: str
    decay: bool
    muon_dims: MuonDimensionNumbers | None


def path_names(path) -> tuple[str, ...]:
    """A jax key path (or nnx path) as strings: ('stacks', '1', 'groups', ...)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        out.append(str(k))
    return tuple(out)


def param_rule(names: tuple[str, ...], shape: tuple[int, ...], use_muon: bool) -> ParamRule:
    """The rule of the parameter at path `names` with `shape` (module docstring)."""
    layer_dims = 1 if names and names[0] == "stacks" else 0  # decoder.LayerStack stacks its groups once
    base = len(shape) - layer_dims
    matrix = base >= 2
    dims = None
    if use_muon and matrix and not ADAMW_MATRICES & set(names):
        n = len(shape)
        per_head_input = len(names) >= 2 and names[-2] in PER_HEAD_INPUT and base == 3
        dims = MuonDimensionNumbers(reduction_axis=n - 3 if per_head_input else n - 2, output_axis=n - 1)
    return ParamRule(layer_dims, "muon" if dims is not None else "adamw", matrix, dims)


def _is_param_leaf(x) -> bool:
    return isinstance(x, nnx.Variable | MaskedNode | jax.ShapeDtypeStruct)


def _map_rules(fn: Callable[[ParamRule], Any], tree, use_muon: bool):
    """fn(rule) at every parameter of `tree` (a params/updates tree: Variables at init, arrays at update;
    optax's MaskedNode placeholders are kept)."""

    def leaf(path, x):
        if isinstance(x, MaskedNode):
            return x
        return fn(param_rule(path_names(path), tuple(x.shape), use_muon))

    return jax.tree.map_with_path(leaf, tree, is_leaf=_is_param_leaf)


def decay_mask(tree) -> Any:
    """True where weight decay applies (per-layer matrices), for a params tree."""
    return _map_rules(lambda r: r.decay, tree, use_muon=False)


def trainable_filter(stage: Stage) -> nnx.filterlib.Filter:
    """The nnx filter of the parameters a stage trains; use it as `wrt` of nnx.grad and nnx.Optimizer.

    dense_warmup: the DSA indexers only (every Param under an `indexer` submodule, the MTP layer's too);
    sparse, full: every Param. Never RouterBias or any other non-Param variable."""
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {STAGES}, got {stage!r}")
    if stage == "dense_warmup":
        return nnx.All(nnx.Param, nnx.PathContains("indexer"))
    return nnx.Param


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One row of `param_plan`: a parameter, whether the stage trains it, and its rule."""

    path: str
    shape: tuple[int, ...]
    trainable: bool
    rule: ParamRule


def param_plan(model: nnx.Module, cfg: OptimizerConfig, stage: Stage) -> list[ParamPlan]:
    """Every Param of `model` (abstract models work) with its training rule: for logs and reviews."""
    trainable = nnx.filterlib.to_predicate(trainable_filter(stage))
    rows = []
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            names = path_names(path)
            rows.append(ParamPlan("/".join(names), tuple(v.shape), bool(trainable(path, v)),
                                  param_rule(names, tuple(v.shape), cfg.name == "muon")))
    return sorted(rows, key=lambda r: r.path)


# ------------------------------------------------------------------------------------- transformations


class ClipState(NamedTuple):
    """grad_norm: global norm of the last gradient before clipping (float32), for the train metrics."""

    grad_norm: jax.Array


def clip_by_global_norm_recorded(max_norm: float | None) -> optax.GradientTransformation:
    """optax.clip_by_global_norm that also keeps the pre-clip norm in its state (None: record only)."""

    def init(params):
        del params
        return ClipState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        # The squares are summed in float32 whatever the gradient dtype.
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(updates)))
        if max_norm is not None:
            scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
            updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
        return updates, ClipState(norm)

    return optax.GradientTransformation(init, update)


def _cast_floats(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


def moments_stored_in(dtype: jnp.dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its floating-point state stored in `dtype` and computed in float32 (optax's scale_by_adam
    can lower only its first moment; DeepSeek-V3 keeps both AdamW moments in bfloat16)."""
    if jnp.dtype(dtype) == jnp.float32:
        return inner

    def init(params):
        return _cast_floats(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, _cast_floats(state, jnp.float32), params)
        return updates, _cast_floats(state, dtype)

    return optax.GradientTransformation(init, update)


def _muon_dims(tree):
    return _map_rules(lambda r: r.muon_dims, tree, use_muon=True)


def scale_muon_update(consistent_rms: float | None) -> optax.GradientTransformation:
    """Per-slice shape scaling of an orthogonalised update: consistent_rms * sqrt(max(fan_in, fan_out)) (its
    RMS is then consistent_rms) or, with None, sqrt(max(1, fan_out / fan_in)); fan_in/out are the slice's
    (in, out) dims, never the stacked layer, expert or head dims."""

    def scale(u, dims: MuonDimensionNumbers):
        fan_in, fan_out = u.shape[dims.reduction_axis], u.shape[dims.output_axis]
        if consistent_rms is None:
            return u * math.sqrt(max(1.0, fan_out / fan_in))
        return u * (consistent_rms * math.sqrt(max(fan_in, fan_out)))

    def update(updates, state, params=None):
        del params
        dims = _muon_dims(updates)
        return jax.tree.map(scale, updates, dims, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _labels(tree):
    return _map_rules(lambda r: r.optimizer, tree, use_muon=True)


def build_optimizer(cfg: OptimizerConfig, stage: Stage) -> tuple[optax.GradientTransformation, Any]:
    """-> (tx, wrt): the optax transformation and the nnx filter of the parameters it updates.

    tx = chain(clip_by_global_norm_recorded, AdamW | partition(Muon, AdamW)); AdamW's decay follows
    `decay_mask`, Muon's parameters are all matrices (all decayed). Both branches scale by
    `make_schedule(cfg)`."""
    wrt = trainable_filter(stage)
    schedule = make_schedule(cfg)
    adamw = optax.chain(
        moments_stored_in(cfg.moment_jnp_dtype, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
    if cfg.name == "adamw":
        inner = adamw
    else:
        # optax.contrib.muon() itself would give its AdamW branch an unmasked weight decay (norms decayed),
        # Nesterov, and Muon's eps; its parts are composed here instead.
        muon = optax.chain(
            scale_by_muon(ns_steps=cfg.muon_ns_steps, beta=cfg.muon_beta, mu_dtype=cfg.moment_jnp_dtype,
                          weight_dimension_numbers=_muon_dims),
            scale_muon_update(cfg.muon_consistent_rms),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
        inner = optax.partition({"adamw": adamw, "muon": muon}, _labels)
    return optax.chain(clip_by_global_norm_recorded(cfg.clip_norm), inner), wrt


# ----------------------------------------------------------------------------- the nnx optimizer, sharding


def optimizer_shardings(optimizer: nnx.Optimizer | nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """NamedShardings for `nnx.state(optimizer)`: every moment (an OptVariable carrying its parameter's
    `logical_axes`, which tx.init propagates) is sharded exactly like its parameter; counters, the
    recorded norm and Muon's coefficients are replicated."""
    state = optimizer if isinstance(optimizer, nnx.State) else nnx.state(optimizer)

    def leaf(path, v):
        if isinstance(v, nnx.Variable) and "logical_axes" in v.get_metadata():
            return param_sharding(v, mesh, rules, "optimizer state " + "/".join(path_names(path)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map_with_path(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_optimizer(model: nnx.Module, cfg: OptimizerConfig, stage: Stage, *, mesh: Mesh | None = None,
                     rules=None) -> nnx.Optimizer:
    """nnx.Optimizer over the stage's trainable Params of `model`.

    With a mesh (the model already placed, e.g. by sharding.shard_model) the state is created by a jitted
    init whose outputs carry `optimizer_shardings`: no moment is ever materialised whole on one device."""
    tx, wrt = build_optimizer(cfg, stage)
    low = sorted({str(v.dtype) for v in jax.tree.leaves(nnx.state(model, wrt)) if v.dtype != jnp.float32})
    if low:
        warnings.warn(f"create_optimizer: parameters stored as {low}; train with float32 masters "
                      "(ModelOptions(param_dtype=jnp.float32, dtype=jnp.bfloat16))", stacklevel=2)
    if mesh is None:
        return nnx.Optimizer(model, tx, wrt=wrt)
    graphdef, state = nnx.split(model)
    opt_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: nnx.Optimizer(model, tx, wrt=wrt)))

    # The model's state is an argument, not a closure: a closed-over array would become a constant.
    @functools.partial(jax.jit, out_shardings=optimizer_shardings(abstract, mesh, rules))
    def init(state):
        return nnx.state(nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=wrt))

    return nnx.merge(opt_graphdef, init(state))


def last_grad_norm(optimizer: nnx.Optimizer) -> jax.Array:
    """The global gradient norm (before clipping) of the optimizer's last update."""
    found = [s for s in jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, ClipState))
             if isinstance(s, ClipState)]
    if len(found) != 1:
        raise ValueError("last_grad_norm: the optimizer was not built by build_optimizer")
    return found[0].grad_norm[...]


def step_metrics(optimizer: nnx.Optimizer, cfg: OptimizerConfig) -> dict[str, jax.Array]:
    """After `optimizer.update`: {"grad_norm": pre-clip global norm, "lr": the learning rate it used}."""
    step = optimizer.step[...].astype(jnp.int32)
    return {"grad_norm": last_grad_norm(optimizer), "lr": make_schedule(cfg)(jnp.maximum(step - 1, 0))}


def optimizer_state_bytes(optimizer: nnx.Optimizer) -> int:
    """Bytes of the optimizer state (moments, counters), not counting the parameters."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(optimizer)))


# ---------------------------------------------------------------------------------- gradient accumulation


class Accumulated(NamedTuple):
    """grads: a State of the trainable Params' gradients of sum(numerators) / sum(weights); loss: that
    ratio; weight: sum(weights); aux: loss_fn's aux, stacked over micro-batches ([steps, ...])."""

    grads: nnx.State
    loss: jax.Array
    weight: jax.Array
    aux: Any


def split_micro_batches(batch, steps: int):
    """[N, ...] leaves -> [steps, N / steps, ...]; micro-batch j takes rows j, j + steps, ... (strided), so
    with the batch dim sharded over devices every micro-batch keeps the same per-device share."""

    def split(x):
        if x.shape[0] % steps:
            raise ValueError(f"split_micro_batches: batch dim {x.shape[0]} is not divisible by {steps} steps")
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable[[nnx.Module, Any], tuple[jax.Array, tuple[jax.Array, Any]]],
                         model: nnx.Module, batch, *, steps: int, wrt) -> Accumulated:
    """Gradients over `steps` micro-batches of `batch`, for use inside the jitted train step.

    loss_fn(model, micro_batch) -> (numerator, (weight, aux)): e.g. the summed token losses and the token
    count (glmjax.train.losses.chunked_cross_entropy returns both). The result is the gradient of
    sum(numerator) / sum(weight) over the whole batch; a loss_fn returning a mean with weight 1 gives the
    mean of the micro-batch gradients. Only `wrt` (the optimizer's filter) is differentiated. Micro-batches
    run sequentially in a lax.scan (one micro-batch's activations alive at a time); the float32 gradient
    sum is the only extra memory."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def one(micro):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), micro)

        (num, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return num, weight, aux, grads

    if steps == 1:
        num, weight, aux, grads = one(batch)
        aux = jax.tree.map(lambda a: a[None], aux)
    else:
        def body(carry, micro):
            g_sum, n_sum, w_sum = carry
            num, weight, aux, grads = one(micro)
            g_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_sum, grads)
            return (g_sum, n_sum + num, w_sum + weight), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, num, weight), aux = jax.lax.scan(body, init, split_micro_batches(batch, steps))
    scale = 1.0 / jnp.maximum(weight, 1e-30)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    return Accumulated(grads, num * scale, weight, aux)
