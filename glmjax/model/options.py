"""Runtime options of the model: how it computes, as opposed to what it is (that is `GlmMoeDsaConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

AttentionImpl = Literal["reference", "pallas", "pallas_tpu", "pallas_gpu"]
ATTENTION_IMPLS: tuple[str, ...] = ("reference", "pallas", "pallas_tpu", "pallas_gpu")

# What the backward pass keeps of the forward (jax.checkpoint policies, decoder.py): "none": everything;
#   "nothing": only each scanned IndexShare group's input (each layer's forward then runs three times);
#   "layer_input": each decoder layer's input (twice); "attention": each layer's input and attention output.
# In every policy but "none" the backward holds one layer's intermediates at a time.
Remat = Literal["none", "nothing", "layer_input", "attention"]
REMAT_POLICIES: tuple[str, ...] = ("none", "nothing", "layer_input", "attention")

# The MoE's grouped matmul: megablox (Pallas, TPU), XLA ragged_dot (GPU), or a routed-rows-only tiled loop
# (CPU). None picks the default backend's; an ahead-of-time TPU compile from a CPU host names "megablox".
MoEGroupedMatmul = Literal["megablox", "ragged_dot", "tiled"]


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """dtype: activations and matmul inputs; param_dtype: stored weights (the router's correction bias stays
    float32, as in transformers; the indexer's weights_proj is stored in param_dtype and its head weights
    come out of a float32-accumulated matmul as float32).

    attention_impl selects the DSA kernels; interpret runs the Pallas kernels in interpret mode (for CPU
    tests): a kernel family that does not match the compile target is an error unless it is set.
    q_block is the query-block length of the chunked DSA path (every impl): memory per block is
    O(q_block * (index_heads * S + topk * 576)) instead of O(T * S); the pure-JAX reference takes more
    queries per block while a block stays under 4M elements (pallas_kernels.common.reference_q_block).
    remat: see REMAT_POLICIES.
    indexer_loss: collect the DSA indexer's KL terms (sparse stage) in the auxiliary outputs.
    moe_gmm_impl, moe_capacity_factor: the MoE's grouped matmul and expert-parallel exchange slots (see
    glmjax.model.moe.MoE); interpret also runs megablox in interpret mode.
    dense_attention: every query attends to all its allowed keys and no top-k is selected: the DSA dense
    warm-up, where the indexer learns the dense attention's distribution (with indexer_loss, its KL is then
    over every key, per IndexShare group). Blockwise pure JAX (pallas_kernels.dense_warmup), O(q_block x
    k_block) memory at any length, whatever attention_impl says. Forward-only: the attention passes no
    gradient to the model, which the warm-up freezes (only the indexers train, on their detached inputs).
    scan_layers: stack identical IndexShare groups and run them with lax.scan (training: compile time does
    not grow with depth). False gives every group its own parameters and runs them one after the other
    (serving, as MaxText decodes from unscanned checkpoints): a scan slices each layer's weights out of the
    stacked arrays on every step, and XLA copies those slices (the expert weights of every MoE layer, every
    decode step) before the grouped matmul reads them."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "reference"
    interpret: bool = False
    q_block: int = 128
    remat: Remat = "none"
    indexer_loss: bool = False
    moe_gmm_impl: MoEGroupedMatmul | None = None
    moe_capacity_factor: float | None = 2.0
    dense_attention: bool = False
    scan_layers: bool = True

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelOptions.attention_impl: {self.attention_impl!r} is not one of {ATTENTION_IMPLS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelOptions.remat: {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ValueError(f"ModelOptions.moe_capacity_factor: must be positive or None, got "
                             f"{self.moe_capacity_factor}")
        if self.q_block <= 0:
            raise ValueError(f"ModelOptions.q_block: must be positive, got {self.q_block}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
