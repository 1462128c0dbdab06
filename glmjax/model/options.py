"""Runtime options of the model: how it computes, as opposed to what it is (that is `GlmMoeDsaConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

AttentionImpl = Literal["reference", "pallas", "pallas_tpu", "pallas_gpu"]
ATTENTION_IMPLS: tuple[str, ...] = ("reference", "pallas", "pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """dtype: activations and matmul inputs; param_dtype: stored weights (the router bias and the indexer's
    weights_proj stay float32, as in transformers). attention_impl selects the DSA kernels. q_block is the
    query-block length of the chunked DSA path: memory per block is O(q_block * (index_heads * S + topk * 576))
    instead of O(T * S)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "reference"
    q_block: int = 128

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelOptions.attention_impl: {self.attention_impl!r} is not one of {ATTENTION_IMPLS}"
            )
        if self.q_block <= 0:
            raise ValueError(f"ModelOptions.q_block: must be positive, got {self.q_block}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
