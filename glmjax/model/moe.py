"""Mixture of experts: sigmoid router with aux-loss-free correction bias (noaux_tc), grouped expert matmuls,
expert parallelism.

Routing (in float32): s = sigmoid(x W_r); experts are *chosen* by s + e_score_correction_bias (with
group-limited top-k when n_group > 1: groups ranked by the sum of their two best biased scores), but
*weighted* by the unbiased s of the chosen experts, normalized to sum 1 (norm_topk_prob), times
routed_scaling_factor. A shared SwiGLU expert sees every token. The correction bias is a `RouterBias`
variable, not an `nnx.Param`: optimizers over Params leave it alone and the load balancer updates it.

Expert compute: the (token, expert) assignments are sorted by expert and run through three grouped matmuls
(`pallas_kernels.grouped_matmul`: megablox on TPU, ragged_dot on GPU, a routed-rows-only tile loop on CPU).
Invalid (padding) tokens are not dispatched at all: their routed output is 0. On CPU with few tokens per
expert (decode, verification, drafting) every expert runs on every token instead, and the chosen outputs
are gathered (`_dense_ffn`, below DENSE_ROWS_PER_EXPERT).

Under a mesh (`jax.set_mesh`) the routed part runs in `jax.shard_map` (docs/moe.md): every device routes
its own tokens; the devices along the mesh axes of the "experts" rule form an expert-parallel (EP) group
holding E / n_ep experts each, and exchange assignment rows with `all_to_all` in rounds of fixed-size slots
until every row has been served (dropless: no row is ever dropped, whatever the routing); a device runs its
local experts on what it receives and sends the results back. The moe_mlp dim may be sharded ("tensor"):
the down projection then gives partial sums, added by one psum of the combined [tokens, D] output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.layers import param
from glmjax.model.mlp import MLP
from glmjax.model.options import ModelOptions
from glmjax.sharding import current_mesh, logical_to_spec
from pallas_kernels.grouped_matmul import CPU_TILE, check_impl, grouped_matmul
from pallas_kernels.grouped_matmul.cpu import varying_like

SLOT_ALIGN = 8  # exchange slots are rounded up to whole sublanes


class RouterBias(nnx.Variable):
    """The router's e_score_correction_bias [E] (float32): state updated by the aux-loss-free balancer, not a
    trained parameter. Carries `logical_axes` like a Param, so it is sharded and checkpointed like one."""


class Routing(NamedTuple):
    experts: jax.Array  # [N, k] int32 chosen experts
    weights: jax.Array  # [N, k] float32 combine weights
    scores: jax.Array  # [N, E] float32 sigmoid scores (for balance losses and load statistics)


class MoEStats(NamedTuple):
    """Routing statistics of one MoE call, float32, over the global batch and excluding invalid tokens.

    load [E]: assignments routed to each expert. seq_load [B,E]: the same per sequence. seq_score [B,E]: per
    sequence, the mean over its valid tokens of the sigmoid scores normalized to sum 1 over experts (the P_i
    of DeepSeek-V3's sequence-wise balance loss; differentiable in the router weight); 0 for a sequence with
    no valid token."""

    load: jax.Array
    seq_load: jax.Array
    seq_score: jax.Array


def route(cfg: GlmMoeDsaConfig, x: jax.Array, weight: jax.Array, bias: jax.Array) -> Routing:
    """x [N, D], router weight [D, E], correction bias [E] -> Routing (all in float32)."""
    logits = jnp.dot(x.astype(jnp.float32), weight.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        N, E = choice.shape
        grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, best_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], best_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, E // cfg.n_group, axis=1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores)


class Router(nnx.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        E = cfg.n_routed_experts
        self.cfg = cfg
        self.weight = param(rngs, (cfg.hidden_size, E), ("embed", "experts"), opts.param_dtype,
                            std=cfg.initializer_range)
        # Kept in float32 like transformers (_keep_in_fp32_modules_strict).
        self.e_score_correction_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=("experts",))

    def __call__(self, x: jax.Array) -> Routing:
        """x [N, D] -> Routing."""
        return route(self.cfg, x, self.weight[...], self.e_score_correction_bias[...])


class Experts(nnx.Module):
    """Routed expert weights stacked on a leading experts axis: gate/up [E, D, I], down [E, I, D]."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        std, dt = cfg.initializer_range, opts.param_dtype
        self.gate_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), dt, std=std)
        self.up_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), dt, std=std)
        self.down_proj = param(rngs, (E, I, D), ("experts", "moe_mlp", "embed"), dt, std=std)


# ------------------------------------------------------------------------------------- per-device compute


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one MoE call, as seen by one device (hashable: a custom_vjp static argument).

    ep: mesh axes of the expert-parallel group (() = all experts local); n_ep its size. tp: mesh axes the
    moe_mlp dim is split over (partial sums). token_axes / seq_axes: the mesh axes tokens / the sequence
    dim are split over (for the statistics). slot: rows per (source, destination) pair and round."""

    num_experts: int
    dtype: jnp.dtype
    impl: str
    interpret: bool
    ep: tuple[str, ...] = ()
    n_ep: int = 1
    tp: tuple[str, ...] = ()
    token_axes: tuple[str, ...] = ()
    seq_axes: tuple[str, ...] = ()
    slot: int = 0


def _gmm(plan: _Plan, lhs, rhs, group_sizes, out_dtype):
    return grouped_matmul(lhs, rhs.astype(plan.dtype), group_sizes, impl=plan.impl, interpret=plan.interpret,
                          preferred_element_type=out_dtype)


def _out_dtype(plan: _Plan):
    """Expert outputs are kept in the activation dtype (they are [tokens * top_k, D], the MoE's largest
    arrays), except partial sums over a split moe_mlp, which stay float32 until their psum."""
    return jnp.float32 if plan.tp else plan.dtype


def _ffn(plan: _Plan, xs, group_sizes, wg, wu, wd):
    """Rows xs [R, D] sorted by local expert, group_sizes [El] -> [R, D] in _out_dtype (rows past the groups:
    0). With moe_mlp split over tp, a partial sum."""
    # gate and up come out in the activation dtype (accumulated in float32 inside the matmul): they are
    # [rows, I] per exchange round, and h is cast to it for the down projection anyway.
    if plan.impl == "tiled" and xs.shape[0] >= CPU_TILE * wg.shape[0]:
        # With many rows per expert (training, prefill) the CPU loop runs gate and up as one product against
        # [wg | wu]: half the loop steps, each twice as wide (the benchmark's training step: 1.04x). The copy
        # of the two matrices would dominate a decode step, which reads each expert's weights for a few rows.
        I = wg.shape[-1]
        gu = _gmm(plan, xs, jnp.concatenate([wg, wu], axis=-1), group_sizes, out_dtype=plan.dtype)
        g, u = gu[:, :I].astype(jnp.float32), gu[:, I:].astype(jnp.float32)
    else:
        g = _gmm(plan, xs, wg, group_sizes, out_dtype=plan.dtype).astype(jnp.float32)
        u = _gmm(plan, xs, wu, group_sizes, out_dtype=plan.dtype).astype(jnp.float32)
    h = jax.nn.silu(g) * u
    return _gmm(plan, h.astype(plan.dtype), wd, group_sizes, out_dtype=_out_dtype(plan))


# The CPU path with few tokens (decode, draft verification, MTP drafting): every local expert runs on every
# token as one batched product ([E, n, D] x [E, D, I]) and the k chosen outputs are gathered. E/k times the
# arithmetic of the routed loop, but each expert matrix is read in place, at full memory bandwidth, with no
# per-tile loop. benchmarks/bench_moe_cpu: 1.2-2.6x faster than the loop up to 16 routed rows per expert on
# average (n * k / E; 32 experts, top-8: 6.6 -> 2.6 ms at 4 tokens), level at one token, and at 32 rows per
# expert anywhere from 0.72x (8 experts, top-2) to 1.48x (docs/moe.md). Training and prefill batches stay on
# the loop.
DENSE_ROWS_PER_EXPERT = 16


def _dense_below(plan: _Plan, n: int, k: int) -> bool:
    """Whether n tokens with top-k routing take the dense CPU path (all local experts, no exchange)."""
    return plan.impl == "tiled" and plan.n_ep == 1 and n * k <= DENSE_ROWS_PER_EXPERT * plan.num_experts


def _dense_ffn(plan: _Plan, x, experts, wg, wu, wd):
    """Every expert on every token: x [n, D], experts [n, k] -> the chosen experts' outputs [n, k, D] in
    _out_dtype, with _ffn's dtypes (gate and up rounded to the activation dtype; so the same values as the
    routed loop up to the order of each product's sums)."""
    E = wg.shape[0]
    xb = jnp.broadcast_to(x, (E,) + x.shape)  # a batch dim on both sides: XLA:CPU then reads each W[e] in place
    g = jnp.einsum("end,edi->eni", xb, wg, preferred_element_type=jnp.float32).astype(plan.dtype)
    u = jnp.einsum("end,edi->eni", xb, wu, preferred_element_type=jnp.float32).astype(plan.dtype)
    h = jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)
    y = jnp.einsum("eni,eid->end", h.astype(plan.dtype), wd, preferred_element_type=jnp.float32)
    return y[experts, jnp.arange(x.shape[0])[:, None]].astype(_out_dtype(plan))


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _exchange_round(plan: _Plan, r, xs, sorted_expert, dest_start, dest_count, wg, wu, wd):
    """Round r of the EP exchange: for each destination j, this device's rows dest_start[j] + r*slot + [0,
    slot) of its expert-sorted rows xs [M, D] (those inside j's range) go to j; j runs them through its
    experts and sends the results back. -> [M, D] in _out_dtype: this round's rows' results, 0 elsewhere."""
    M = xs.shape[0]
    n_ep, slot = plan.n_ep, plan.slot
    El = plan.num_experts // n_ep
    within = r * slot + jnp.arange(slot, dtype=jnp.int32)  # [slot]
    ok = within[None, :] < dest_count[:, None]  # [n_ep, slot]
    idx = jnp.where(ok, dest_start[:, None] + within[None, :], 0)
    send_x = jnp.where(ok[..., None], xs[idx], 0)  # [n_ep, slot, D]
    local_e = sorted_expert[idx] - (jnp.arange(n_ep, dtype=jnp.int32) * El)[:, None]
    send_e = jnp.where(ok, local_e, El)  # El: an empty slot
    recv_x = jax.lax.all_to_all(send_x, plan.ep, 0, 0, tiled=True).reshape(n_ep * slot, -1)
    recv_e = jax.lax.all_to_all(send_e, plan.ep, 0, 0, tiled=True).reshape(n_ep * slot)
    # Each source's rows are sorted by expert, the concatenation is not: sort by local expert.
    perm = jnp.argsort(recv_e, stable=True)
    group_sizes = jnp.bincount(recv_e, length=El).astype(jnp.int32)  # empty slots (El) are not counted
    out = _ffn(plan, recv_x[perm], group_sizes, wg, wu, wd)
    # Scatters with distinct indices (a permutation; empty slots to distinct out-of-range rows) lower to plain
    # writes, not to the read-modify-write loops a possibly-colliding scatter-add needs on TPU.
    back = jnp.zeros_like(out).at[perm].set(out, unique_indices=True).reshape(n_ep, slot, -1)
    back = jax.lax.all_to_all(back, plan.ep, 0, 0, tiled=True)  # [n_ep, slot, D]: results of my rows
    dest = jnp.where(ok, idx, M + jnp.arange(n_ep * slot, dtype=jnp.int32).reshape(n_ep, slot))
    return jnp.zeros((M, back.shape[-1]), back.dtype).at[dest].set(back, mode="drop", unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ep_experts(plan: _Plan, xs, wg, wu, wd, sorted_expert, dest_start, dest_count, rounds):
    """Expert outputs [M, D] (_out_dtype) of this device's expert-sorted rows xs [M, D], served by the EP group
    in `rounds` exchange rounds (a traced count: a while loop, hence the custom_vjp). Each row is served in
    exactly one round, so accumulating the rounds in the activation dtype adds only zeros."""
    def body(r, acc):
        return acc + _exchange_round(plan, r, xs, sorted_expert, dest_start, dest_count, wg, wu, wd)

    init = varying_like(jnp.zeros(xs.shape, _out_dtype(plan)), xs, wg, wu, wd, sorted_expert, dest_count)
    return jax.lax.fori_loop(0, rounds, body, init)


def _ep_fwd(plan, xs, wg, wu, wd, sorted_expert, dest_start, dest_count, rounds):
    out = _ep_experts(plan, xs, wg, wu, wd, sorted_expert, dest_start, dest_count, rounds)
    return out, (xs, wg, wu, wd, sorted_expert, dest_start, dest_count, rounds)


def _ep_bwd(plan, res, dout):
    """Replays each round under jax.vjp (the round is recomputed, as remat would) and sums the cotangents;
    the vjp of the all_to_alls sends the row cotangents back the way the rows came."""
    xs, wg, wu, wd, sorted_expert, dest_start, dest_count, rounds = res

    def body(r, acc):
        def one_round(xs, wg, wu, wd):
            return _exchange_round(plan, r, xs, sorted_expert, dest_start, dest_count, wg, wu, wd)

        _, vjp = jax.vjp(one_round, xs, wg, wu, wd)
        return jax.tree.map(jnp.add, acc, vjp(dout))

    zeros = tuple(varying_like(jnp.zeros(a.shape, a.dtype), a) for a in (xs, wg, wu, wd))  # the primals' types
    dxs, dwg, dwu, dwd = jax.lax.fori_loop(0, rounds, body, zeros)
    return dxs, dwg, dwu, dwd, None, None, None, None


_ep_experts.defvjp(_ep_fwd, _ep_bwd)


def _dispatch(plan: _Plan, xf, experts, v, wg, wu, wd):
    """The chosen experts' outputs through the grouped matmuls: xf [n, D], experts [n, k], v [n] bool ->
    [n, k, D] in _out_dtype (0 for invalid tokens, which are not dispatched). Assignments are sorted by
    expert; under expert parallelism they travel to the devices holding their experts and back."""
    n, k = experts.shape
    E = plan.num_experts
    flat = jnp.where(v[:, None], experts, E).reshape(-1)  # invalid tokens -> E, sorted last
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=E).astype(jnp.int32)  # E (invalid) is not counted
    xs = xf[order // k].astype(plan.dtype)  # [n*k, D], grouped by expert
    if plan.n_ep == 1:
        ys = _ffn(plan, xs, counts, wg, wu, wd)
    else:
        dest_count = counts.reshape(plan.n_ep, -1).sum(1)
        dest_start = jnp.cumsum(dest_count) - dest_count
        need = jnp.max(-(-dest_count // plan.slot))
        # Every device of an EP group must run the same number of rounds (each holds all_to_alls); `need`
        # can differ only across devices holding different tokens.
        rounds = jax.lax.pmax(need, plan.token_axes) if plan.token_axes else need
        ys = _ep_experts(plan, xs, wg, wu, wd, flat[order], dest_start, dest_count, rounds)
    return ys[jnp.argsort(order)].reshape(n, k, -1)  # back to (token, slot) order: a gather, not a scatter


def _routed_local(cfg: GlmMoeDsaConfig, plan: _Plan, x, valid, w_router, bias, wg, wu, wd):
    """One device's routed experts. x [b,t,D], valid [b,t] -> (routed [b,t,D] float32, MoEStats with
    seq_load/seq_score [b,E]); expert weights hold this device's experts (and moe_mlp slice)."""
    b, t, D = x.shape
    xf = x.reshape(b * t, D)
    v = valid.reshape(b * t)
    routing = route(cfg, xf, w_router, bias)
    if _dense_below(plan, b * t, cfg.num_experts_per_tok):
        y = jnp.where(v[:, None, None], _dense_ffn(plan, xf.astype(plan.dtype), routing.experts, wg, wu, wd), 0)
    else:
        y = _dispatch(plan, xf, routing.experts, v, wg, wu, wd)
    return _combine(cfg, plan, routing, y, valid)


def _combine(cfg: GlmMoeDsaConfig, plan: _Plan, routing: Routing, y, valid):
    """The chosen experts' outputs y [n, k, D] (0 for invalid tokens) weighted and summed, and the routing
    statistics -> (routed [b,t,D] float32, MoEStats)."""
    b, t = valid.shape
    n, k, D = y.shape
    E = cfg.n_routed_experts
    v = valid.reshape(n)
    routed = jnp.einsum("nkd,nk->nd", y, routing.weights.astype(y.dtype), preferred_element_type=jnp.float32)
    routed = _psum(routed, plan.tp).reshape(b, t, D)

    hits = jnp.sum(jax.nn.one_hot(routing.experts, E, dtype=jnp.float32), axis=1)  # [n, E]
    hits = jnp.where(v[:, None], hits, 0).reshape(b, t, E)
    normed = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
    normed = jnp.where(v[:, None], normed, 0).reshape(b, t, E)
    tokens = _psum(jnp.sum(valid.astype(jnp.float32), axis=1), plan.seq_axes)  # [b]
    stats = MoEStats(
        load=_psum(jnp.sum(hits, axis=(0, 1)), plan.token_axes),
        seq_load=_psum(jnp.sum(hits, axis=1), plan.seq_axes),
        seq_score=_psum(jnp.sum(normed, axis=1), plan.seq_axes) / jnp.maximum(tokens, 1.0)[:, None],
    )
    return routed, stats


# ------------------------------------------------------------------------------------------------- module


def _axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry -> its mesh axes."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


class MoE(nnx.Module):
    """Routed experts (stacked [E, ...] weights) plus the shared expert.

    From ModelOptions: moe_gmm_impl, the grouped matmul (pallas_kernels.grouped_matmul.GMM_IMPLS; None = the
    default backend's), and moe_capacity_factor, which sizes the expert-parallel exchange slots
    (docs/moe.md): each round a device sends at most slot = ceil(capacity_factor * rows / n_ep) rows
    (rows = its tokens * top_k) to each EP peer, so one round serves routing up to capacity_factor times more
    skewed than uniform; more skew costs more rounds, never dropped rows. None: slots for the worst case
    (always one round, n_ep times the memory)."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        check_impl(opts.moe_gmm_impl)  # a bad name fails at construction, not at the first call
        self.cfg, self.opts = cfg, opts
        self.gmm_impl, self.capacity_factor = opts.moe_gmm_impl, opts.moe_capacity_factor
        self.gate = Router(cfg, opts, rngs=rngs)
        self.experts = Experts(cfg, opts, rngs=rngs)
        # The shared expert is a dense MLP of every token: tensor-parallel like one ("mlp"), unlike the routed
        # experts, which are split whole over the expert-parallel axes.
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, opts,
                                  std=cfg.initializer_range, axis="mlp", rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
        """x [B,T,D], valid [B,T] bool (None: every token) -> (y [B,T,D] in opts.dtype, MoEStats).
        Invalid tokens get only the shared expert's output and are left out of the statistics."""
        B, T, _ = x.shape
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        impl = check_impl(self.gmm_impl)
        plan = _Plan(self.cfg.n_routed_experts, self.opts.dtype, impl, bool(self.opts.interpret) and impl == "megablox")
        ex, gate = self.experts, self.gate
        # Expert weights enter in the compute dtype: under a mesh their FSDP gather then moves bf16, not the
        # float32 masters. The router stays float32.
        dt = self.opts.dtype
        weights = (gate.weight[...], gate.e_score_correction_bias[...], ex.gate_proj[...].astype(dt),
                   ex.up_proj[...].astype(dt), ex.down_proj[...].astype(dt))
        mesh = current_mesh()
        if mesh is None:
            routed, stats = _routed_local(self.cfg, plan, x, valid, *weights)
        else:
            routed, stats = self._sharded(plan, mesh, x, valid, weights)
        dt = self.opts.dtype
        return (routed.astype(dt) + self.shared_experts(x)).astype(dt), stats

    def _sharded(self, plan: _Plan, mesh, x, valid, weights):
        cfg = self.cfg
        B, T, _ = x.shape
        E, I, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        batch, seq = _axes(logical_to_spec(("batch",), mesh=mesh)[0]), _axes(logical_to_spec(("seq",), mesh=mesh)[0])
        ep = _axes(logical_to_spec(("experts",), (E,), mesh=mesh, what="routed experts")[0])
        tp = _axes(logical_to_spec(("moe_mlp",), (I,), mesh=mesh, what="moe_mlp")[0])
        # An expert-parallel axis that does not split the tokens (tensor, with the default rules: there the
        # attention's tokens are replicated) splits them here, so no two devices route the same token.
        seq = seq + tuple(a for a in ep if a not in batch + seq)
        token_axes = batch + seq
        if set(tp) & set(token_axes + ep):
            raise ValueError(f"MoE: the moe_mlp mesh axes {tp} must not also split tokens {token_axes} or experts "
                             f"{ep}: the down projection's partial sums would be added across different rows")
        size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
        n_ep, nb, ns = size(ep), size(batch), size(seq)
        # Pad B and T to the token mesh axes (padding tokens are invalid: never dispatched, not counted).
        Bp, Tp = -(-B // nb) * nb, -(-T // ns) * ns
        if (Bp, Tp) != (B, T):
            x = jnp.pad(x, ((0, Bp - B), (0, Tp - T), (0, 0)))
            valid = jnp.pad(valid, ((0, Bp - B), (0, Tp - T)))
        rows = (Bp // nb) * (Tp // ns) * k  # assignment rows per device
        worst = (Bp // nb) * (Tp // ns) * min(k, E // n_ep)  # a token sends at most min(k, El) rows to a peer
        want = worst if self.capacity_factor is None else min(worst, math.ceil(self.capacity_factor * rows / n_ep))
        slot = -(-max(want, 1) // SLOT_ALIGN) * SLOT_ALIGN
        plan = dataclasses.replace(plan, ep=ep, n_ep=n_ep, tp=tp, token_axes=token_axes, seq_axes=seq,
                                   slot=slot)
        tok = P(batch or None, seq or None)
        ep_s, tp_s = ep or None, tp or None
        in_specs = (P(*tok, None), tok, P(), P(), P(ep_s, None, tp_s), P(ep_s, None, tp_s), P(ep_s, tp_s, None))
        out_specs = (P(*tok, None), MoEStats(P(), P(tok[0], None), P(tok[0], None)))
        # megablox's pallas_call declares outputs without varying-axes types, which check_vma rejects.
        fn = jax.shard_map(functools.partial(_routed_local, cfg, plan), mesh=mesh, in_specs=in_specs,
                           out_specs=out_specs, check_vma=plan.impl != "megablox")
        routed, stats = fn(x, valid, *weights)
        return routed[:B, :T], stats._replace(seq_load=stats.seq_load[:B], seq_score=stats.seq_score[:B])
