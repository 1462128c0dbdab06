"""Mixture of experts: sigmoid router with aux-loss-free correction bias (noaux_tc), grouped expert matmuls.

Routing (in float32): s = sigmoid(x W_r); experts are *chosen* by s + e_score_correction_bias (with
group-limited top-k when n_group > 1: groups ranked by the sum of their two best biased scores), but
*weighted* by the unbiased s of the chosen experts, normalized to sum 1 (norm_topk_prob), times
routed_scaling_factor. A shared SwiGLU expert sees every token.

Expert compute: the N*k (token, expert) assignments are sorted by expert and run through
`jax.lax.ragged_dot` (one grouped matmul per projection, no loop over experts). On TPU and GPU XLA lowers
ragged_dot to a real grouped matmul; on CPU (tests only) XLA has no ragged kernel and jax lowers it densely.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.layers import param
from glmjax.model.mlp import MLP
from glmjax.model.options import ModelOptions


class Routing(NamedTuple):
    experts: jax.Array  # [N, k] int32 chosen experts
    weights: jax.Array  # [N, k] float32 combine weights
    scores: jax.Array  # [N, E] float32 sigmoid scores (for balance losses and load statistics)


class Router(nnx.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        E = cfg.n_routed_experts
        self.cfg = cfg
        self.weight = param(rngs, (cfg.hidden_size, E), ("embed", "experts"), opts.param_dtype,
                            std=cfg.initializer_range)
        # Kept in float32 like transformers (_keep_in_fp32_modules_strict); updated by the aux-free balancer.
        self.e_score_correction_bias = param(None, (E,), ("experts",), jnp.float32, fill=0.0)

    def __call__(self, x: jax.Array) -> Routing:
        """x [N, D] -> Routing."""
        cfg = self.cfg
        logits = jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        scores = jax.nn.sigmoid(logits)
        choice = scores + self.e_score_correction_bias[...]
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


class Experts(nnx.Module):
    """Routed expert weights stacked on a leading experts axis: gate/up [E, D, I], down [E, I, D]."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        std, dt = cfg.initializer_range, opts.param_dtype
        self.gate_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), dt, std=std)
        self.up_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), dt, std=std)
        self.down_proj = param(rngs, (E, I, D), ("experts", "moe_mlp", "embed"), dt, std=std)


class MoE(nnx.Module):
    """Routed experts (stacked [E, ...] weights) plus the shared expert; x [B,T,D] -> [B,T,D]."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.cfg, self.opts = cfg, opts
        self.gate = Router(cfg, opts, rngs=rngs)
        self.experts = Experts(cfg, opts, rngs=rngs)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, opts,
                                  std=cfg.initializer_range, axis="moe_mlp", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, D = x.shape
        E, k, dt = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok, self.opts.dtype
        xf = x.reshape(B * T, D)
        routing = self.gate(xf)
        flat_expert = routing.experts.reshape(-1)  # [N*k]
        order = jnp.argsort(flat_expert, stable=True)
        group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
        xs = xf[order // k].astype(dt)  # [N*k, D], grouped by expert

        def grouped(lhs, w):
            return jax.lax.ragged_dot(lhs, w.astype(dt), group_sizes, preferred_element_type=jnp.float32)

        ex = self.experts
        h = jax.nn.silu(grouped(xs, ex.gate_proj[...])) * grouped(xs, ex.up_proj[...])
        ys = grouped(h.astype(dt), ex.down_proj[...]).astype(dt)  # [N*k, D]
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(B * T, k, D)  # back to (token, slot) order
        routed = jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), routing.weights).astype(dt)
        return (routed.reshape(B, T, D) + self.shared_experts(x)).astype(dt)
