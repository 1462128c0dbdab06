"""DeepSeek-V3's auxiliary-loss-free MoE balancing: after each step, every MoE layer's router correction
bias moves toward the experts that received fewer tokens than average,

    bias_e += rate * sign(mean_e'(load_e') - load_e)

The bias only shifts which experts are chosen (route() adds it to the scores for the top-k), not the
combine weights, so the update needs no gradient; it is a `RouterBias` variable, never seen by the
optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glmjax.model.moe import MoE
from glmjax.model.transformer import GlmMoeDsa


def bias_step(load: jax.Array, rate: float) -> jax.Array:
    """load [..., E] assignments per expert -> the bias change [..., E] (float32)."""
    load = load.astype(jnp.float32)
    return rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_router_bias(model: GlmMoeDsa, moe_load: jax.Array | None, mtp_moe_load: jax.Array | None,
                       rate: float) -> None:
    """Applies bias_step in place. moe_load [Lm, E]: the decoder's MoE layers in layer order (LayerAux.moe);
    mtp_moe_load [S, E]: per MTP step (their sum drives the MTP layer's one router)."""
    if rate == 0:
        return
    row = 0
    for stack in model.stacks:
        kinds = stack.segment.kinds
        moe_at = [j for j, k in enumerate(kinds) if k.mlp == "sparse"]
        if not moe_at:
            continue
        G, m = stack.segment.num_groups, len(moe_at)
        rows = moe_load[row:row + G * m].reshape(G, m, -1)
        row += G * m
        for i, j in enumerate(moe_at):
            mlp = stack.groups.layers[j].mlp
            assert isinstance(mlp, MoE)
            bias = mlp.gate.e_score_correction_bias
            bias[...] = bias[...] + bias_step(rows[:, i], rate)
    if moe_load is not None and row != moe_load.shape[0]:
        raise ValueError(f"update_router_bias: {moe_load.shape[0]} MoE load rows for {row} MoE layers")
    if mtp_moe_load is not None and len(model.mtp):
        bias = model.mtp[0].decoder.mlp.gate.e_score_correction_bias
        bias[...] = bias[...] + bias_step(jnp.sum(mtp_moe_load, axis=0), rate)


def load_imbalance(load: jax.Array) -> jax.Array:
    """[L, E] -> [L] max load / mean load per layer (1 = perfectly balanced)."""
    load = load.astype(jnp.float32)
    return jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)

