"""The serving KV cache: per layer the MLA latent rows, and indexer keys on the layers that run the indexer.

Layout (one slot per sequence, a fixed maximum length S per slot; paging comes with 1M-context serving):
- `latent[i]` [G, L, B, S, W] for the model's i-th segment of G IndexShare groups of L layers (G = 1 for
  every segment when the layers are not scanned, ModelOptions.scan_layers): the
  normed kv latent then the roped shared key (r + p values) per token, zero-padded to W. W = r + p, or on TPU
  r + p rounded up to 128 lanes (640 for GLM-5.2): a 576-wide bf16 cache gets a column-major layout there,
  and every decode step would relayout the whole cache (docs/kernels.md).
- `index_keys[i]` [G, B, S, DI]: the indexer keys of each group's full layer (IndexShare: the shared
  layers reuse its selection and store none).
- `mtp_latent` [B, S, W], `mtp_index_keys` [B, S, DI]: the MTP layer's own cache (its row j is computed
  from target hidden state j and token j + 1, so it holds as many rows as the target's).

A call writes rows at positions start[b] + t of the slots it serves and attends over keys s < start[b] +
count[b]. Nothing is ever cleared: a slot's rows past its length are stale and are overwritten before they
become valid, so rolling back (rejected drafts) or reusing a slot only changes lengths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import Keys, Projection
from glmjax.model.decoder import plan_segments


class KVCache(NamedTuple):
    """See the module docstring. A pytree of arrays; every array's slot axis has the same size B."""

    latent: tuple[jax.Array, ...]
    index_keys: tuple[jax.Array, ...]
    mtp_latent: jax.Array | None
    mtp_index_keys: jax.Array | None

    @property
    def slots(self) -> int:
        return self.latent[0].shape[2]

    @property
    def max_len(self) -> int:
        return self.latent[0].shape[3]

    @property
    def width(self) -> int:
        return self.latent[0].shape[4]


def latent_width(cfg: GlmMoeDsaConfig, lane_padded: bool) -> int:
    """Stored row width: r + p, or rounded up to 128 lanes (TPU)."""
    w = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return -(-w // 128) * 128 if lane_padded else w


def cache_shapes(cfg: GlmMoeDsaConfig, slots: int, max_len: int, *, mtp: bool, dtype=jnp.bfloat16,
                 lane_padded: bool = False, scan_layers: bool = True) -> KVCache:
    """The cache as jax.ShapeDtypeStructs (for sizing and ahead-of-time compiles); one buffer per segment of
    the model's layers (scan_layers: ModelOptions.scan_layers)."""
    W, DI = latent_width(cfg, lane_padded), cfg.index_head_dim
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
    segments = plan_segments(cfg, scan_layers)
    has_mtp = mtp and cfg.num_nextn_predict_layers > 0
    return KVCache(
        latent=tuple(sds(s.num_groups, s.group_size, slots, max_len, W) for s in segments),
        index_keys=tuple(sds(s.num_groups, slots, max_len, DI) for s in segments),
        mtp_latent=sds(slots, max_len, W) if has_mtp else None,
        mtp_index_keys=sds(slots, max_len, DI) if has_mtp else None)


def init_cache(cfg: GlmMoeDsaConfig, slots: int, max_len: int, *, mtp: bool, dtype=jnp.bfloat16,
               lane_padded: bool = False, scan_layers: bool = True, sharding=None) -> KVCache:
    """A zeroed cache for `slots` sequences of up to `max_len` tokens (see cache_shapes); `sharding`: a
    jax.sharding.Sharding for every array (e.g. replicated on a mesh)."""
    shapes = cache_shapes(cfg, slots, max_len, mtp=mtp, dtype=dtype, lane_padded=lane_padded,
                          scan_layers=scan_layers)
    make = lambda s: jnp.zeros(s.shape, s.dtype, device=sharding)  # noqa: E731
    return jax.tree.map(make, shapes)


def cache_bytes(cache: KVCache) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


def bytes_per_token(cfg: GlmMoeDsaConfig, *, mtp: bool, dtype=jnp.bfloat16, lane_padded: bool = False) -> int:
    """Cache bytes one token of one sequence occupies."""
    return cache_bytes(cache_shapes(cfg, 1, 1, mtp=mtp, dtype=dtype, lane_padded=lane_padded))


class Rows(NamedTuple):
    """Where a call's new tokens go. slots [B] int32 (the cache slot of each row) or None for every slot in
    order; start [B] int32: the slot's length before the call (the first new token's position); count [B]
    int32: how many of the T new tokens are real (the rest are padding: written, never valid)."""

    slots: jax.Array | None
    start: jax.Array
    count: jax.Array

    def positions(self, T: int) -> jax.Array:
        """[B,T] int32 cache positions (= token indices) of the new tokens."""
        return self.start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

    def key_valid(self, S: int) -> jax.Array:
        """[B,S] bool: the keys that exist after this call."""
        return jnp.arange(S, dtype=jnp.int32)[None, :] < (self.start + self.count)[:, None]

    def take(self, buf: jax.Array) -> jax.Array:
        """buf [B_all, S, ...] -> [B, S, ...] for this call's rows."""
        return buf if self.slots is None else buf[self.slots]


def _scatter(buf: jax.Array, index: tuple, rows: Rows, new: jax.Array) -> jax.Array:
    """buf[*index, slot_b, start_b + t] = new[b, t] (positions past the end are dropped: a last prefill chunk's
    padding, or a verification at the end of a slot)."""
    B, T = new.shape[:2]
    slots = jnp.arange(B, dtype=jnp.int32) if rows.slots is None else rows.slots
    new = new.astype(buf.dtype)
    if new.shape[-1] < buf.shape[-1]:  # lane padding
        new = jnp.pad(new, ((0, 0),) * (new.ndim - 1) + ((0, buf.shape[-1] - new.shape[-1]),))
    return buf.at[index + (slots[:, None], rows.positions(T))].set(new, mode="drop")


class LayerWriter:
    """The cache hook of one layer (`MLAttention.__call__(update=...)`): writes the projection's new rows into
    the layer's buffers at `index` and returns the Keys to attend over. The updated buffers are read back
    from `latent` / `index_keys` after the call (they are traced values of the same function)."""

    def __init__(self, latent: jax.Array, index_keys: jax.Array | None, latent_index: tuple,
                 keys_index: tuple | None, rows: Rows, width: int):
        self.latent, self.index_keys = latent, index_keys
        self.latent_index, self.keys_index, self.rows, self.width = latent_index, keys_index, rows, width

    def __call__(self, proj: Projection) -> Keys:
        rows = self.rows
        self.latent = _scatter(self.latent, self.latent_index, rows, proj.latent)
        lat = rows.take(self.latent[self.latent_index])
        if lat.shape[-1] != self.width:  # the kernels that take the lane-padded width are given it as is
            lat = lat[..., :self.width]
        ik = None
        if proj.index_keys is not None:
            self.index_keys = _scatter(self.index_keys, self.keys_index, rows, proj.index_keys)
            ik = rows.take(self.index_keys[self.keys_index])
        return Keys(lat, ik, rows.key_valid(lat.shape[1]))
