"""The serving KV cache: per layer the MLA latent rows, and indexer keys on the layers that run the indexer.

Slot layout (one slot per sequence, a fixed maximum length S per slot; a mesh may split S: the engine's
"kv_seq" axes):
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

Paged (`page_size`): every buffer is instead a pool of pages shared by the slots, `latent[i]` [G, L, P, page,
W], `index_keys[i]` [G, P, page, DI], the MTP layer's [P, page, ...], and `pages` [B, S / page] int32 is the
page table: position s of slot b lives at row s % page of page pages[b, s // page] (-1: no page; writes
there are dropped and reads are never valid keys). Memory then follows the requests in flight, not B x S:
the engine hands pages out as requests arrive and takes them back as they finish (glmjax.serve.paging).
Attention reads the pool through the table: the indexer scores each row's keys in logical order, and the
sparse MLA kernel gathers its selected rows from the pool by their page-table rows. On a mesh the page axis
is split over the slot groups and the sequence shards (the engine's "kv_pages" rule): each slot group's pages
live with its slots, and each sequence shard holds the pages of its contiguous range of every slot's
positions (glmjax.serve.paging).

FP8 KV (`quant="fp8"`): every latent buffer is `QuantizedRows` (pallas_kernels.quantize): the r latent values
in float8_e4m3fn with one float32 scale per row, the p rope values in `dtype` (the parts are separate
arrays); every indexer-key buffer is QuantizedRows of int8 (the reference) or float8_e4m3fn (the GPU
kernels) keys with per-token scales. Rows are quantized as they are written; the kernels read only the
selected rows and dequantize them. The TPU layout (lane_padded) keeps every array lane-dense and 32-bit
tiled, so that writing a row never relayouts a buffer (an 8-bit array, or a 64-lane one, would be copied
whole on every write): the fp8 values packed four to a uint32 [.., r / 4], the rope tails of 128 / p
positions folded into one 128-lane row ([.., S / 2, 128] for GLM-5.2; quantize.fold_rows: the sparse MLA
gather reads row s // 2 and takes its half), and the int8 indexer keys packed four positions to a uint32
word along the sequence ([.., S / 4, DI]: quantize.pack_sequence, which the TPU scores kernel unpacks in
VMEM). A write reads and rewrites the few packed rows it touches. max_len, a page and a sequence shard then
hold a multiple of position_alignment (4 for GLM-5.2) positions. The layout takes as many bytes per token as
the GPU one.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from glmjax.config import GlmMoeDsaConfig
from glmjax.errors import InputError
from glmjax.model.attention import Keys, Projection
from glmjax.model.decoder import plan_segments
from pallas_kernels.quantize import (
    FP8,
    QuantizedRows,
    fold_rows,
    pack_sequence,
    quantize,
    quantize_rows,
    take_rows,
    unfold_rows,
    unpack_sequence,
)

Quant = Literal["none", "fp8"]


class KVCache(NamedTuple):
    """See the module docstring. A pytree of arrays; every array's slot axis has the same size B (the pools of a
    paged cache have a page axis instead, and `pages` [B, S / page] is their table)."""

    latent: tuple[jax.Array | QuantizedRows, ...]
    index_keys: tuple[jax.Array | QuantizedRows, ...]
    mtp_latent: jax.Array | QuantizedRows | None
    mtp_index_keys: jax.Array | QuantizedRows | None
    pages: jax.Array | None = None

    @property
    def paged(self) -> bool:
        return self.pages is not None

    @property
    def slots(self) -> int:
        return self.pages.shape[0] if self.paged else self.latent[0].shape[2]

    @property
    def page_size(self) -> int | None:
        return self.latent[0].shape[3] if self.paged else None

    @property
    def max_len(self) -> int:
        return self.pages.shape[1] * self.page_size if self.paged else self.latent[0].shape[3]

    @property
    def width(self) -> int:
        return self.latent[0].shape[4]


def latent_width(cfg: GlmMoeDsaConfig, lane_padded: bool) -> int:
    """Stored row width: r + p, or rounded up to 128 lanes (TPU)."""
    w = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return -(-w // 128) * 128 if lane_padded else w


def rope_fold(cfg: GlmMoeDsaConfig, quant: Quant, lane_padded: bool) -> int:
    """Positions per stored rope row: in the TPU FP8 layout 128 / p, so that the rope values of that many
    positions fill one 128-lane row (GLM-5.2: 2 x 64); 1 otherwise (or when p does not divide 128: the tail
    is then padded to 128 lanes)."""
    p = cfg.qk_rope_head_dim
    return 128 // p if quant == "fp8" and lane_padded and 128 % p == 0 else 1


def position_alignment(cfg: GlmMoeDsaConfig, quant: Quant, lane_padded: bool) -> int:
    """max_len, a page and a sequence shard must hold a multiple of this many positions: in the TPU FP8 layout
    the int8 indexer keys pack 4 positions per word and the rope rows rope_fold positions; 1 otherwise."""
    return math.lcm(4, rope_fold(cfg, quant, lane_padded)) if quant == "fp8" and lane_padded else 1


def cache_shapes(cfg: GlmMoeDsaConfig, slots: int, max_len: int, *, mtp: bool, dtype=jnp.bfloat16,
                 lane_padded: bool = False, scan_layers: bool = True, quant: Quant = "none",
                 key_dtype=jnp.int8, page_size: int | None = None, num_pages: int | None = None) -> KVCache:
    """The cache as jax.ShapeDtypeStructs (for sizing and ahead-of-time compiles); one buffer per segment of
    the model's layers (scan_layers: ModelOptions.scan_layers). quant "fp8": latent rows and indexer keys
    quantized (module docstring), the keys to key_dtype (int8, or float8_e4m3fn for the GPU kernels).
    page_size: a paged cache of num_pages pages (max_len must be a multiple of page_size)."""
    if quant not in ("none", "fp8"):
        raise ValueError(f"cache quant: {quant!r} is not 'none' or 'fp8'")
    if page_size is not None and (page_size < 1 or max_len % page_size or not num_pages or num_pages < 1):
        raise ValueError(f"paged cache: max_len {max_len} must be a multiple of page_size {page_size}, and "
                         f"num_pages ({num_pages}) >= 1")
    align = position_alignment(cfg, quant, lane_padded)
    if (page_size or max_len) % align:
        raise ValueError(f"FP8 cache, TPU layout: the {'page size' if page_size else 'max_len'} {page_size or max_len} "
                         f"must be a multiple of {align} (positions per packed key word and folded rope row)")
    r, p, DI = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
    W = latent_width(cfg, lane_padded)
    sds = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dt))  # noqa: E731

    fold = rope_fold(cfg, quant, lane_padded)

    def latent(*lead):
        if quant == "none":
            return sds(*lead, W)
        if lane_padded:  # TPU: values packed in uint32; the rope tails of `fold` positions per 128-lane row
            tail = sds(*lead[:-1], lead[-1] // fold, fold * p) if fold > 1 else sds(*lead, W - r)
            return QuantizedRows(sds(*lead, r // 4, dt=jnp.uint32), sds(*lead, dt=jnp.float32), tail)
        return QuantizedRows(sds(*lead, r, dt=FP8), sds(*lead, dt=jnp.float32), sds(*lead, p))

    def keys(*lead):
        if quant == "none":
            return sds(*lead, DI)
        if lane_padded:  # TPU: int8 keys packed four positions to a uint32 word along the sequence
            return QuantizedRows(sds(*lead[:-1], lead[-1] // 4, DI, dt=jnp.uint32), sds(*lead, dt=jnp.float32))
        return QuantizedRows(sds(*lead, DI, dt=key_dtype), sds(*lead, dt=jnp.float32))

    segments = plan_segments(cfg, scan_layers)
    has_mtp = mtp and cfg.num_nextn_predict_layers > 0
    rows = (slots, max_len) if page_size is None else (num_pages, page_size)
    return KVCache(
        latent=tuple(latent(s.num_groups, s.group_size, *rows) for s in segments),
        index_keys=tuple(keys(s.num_groups, *rows) for s in segments),
        mtp_latent=latent(*rows) if has_mtp else None,
        mtp_index_keys=keys(*rows) if has_mtp else None,
        pages=None if page_size is None else sds(slots, max_len // page_size, dt=jnp.int32))


def init_cache(cfg: GlmMoeDsaConfig, slots: int, max_len: int, *, mtp: bool, dtype=jnp.bfloat16,
               lane_padded: bool = False, scan_layers: bool = True, quant: Quant = "none", key_dtype=jnp.int8,
               page_size: int | None = None, num_pages: int | None = None, sharding=None) -> KVCache:
    """A zeroed cache for `slots` sequences of up to `max_len` tokens (see cache_shapes; a paged cache's table
    is all -1: no page assigned). `sharding`: where every array is created, in place (no copy of the whole
    cache on one device first): one jax.sharding.Sharding or Device for all, or a KVCache of them (the
    engine's slot_shardings)."""
    shapes = cache_shapes(cfg, slots, max_len, mtp=mtp, dtype=dtype, lane_padded=lane_padded,
                          scan_layers=scan_layers, quant=quant, key_dtype=key_dtype, page_size=page_size,
                          num_pages=num_pages)
    if isinstance(sharding, KVCache):
        cache = jax.tree.map(lambda s, where: jnp.zeros(s.shape, s.dtype, device=where), shapes, sharding)
        table = sharding.pages
    else:
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=sharding), shapes)
        table = sharding
    if cache.paged:
        cache = cache._replace(pages=jnp.full(cache.pages.shape, -1, jnp.int32, device=table))
    return cache


def check_split(cfg: GlmMoeDsaConfig, *, slots: int, max_len: int, quant: Quant, lane_padded: bool,
                page_size: int | None = None, num_pages: int | None = None, slot_axes: tuple[str, ...] = (),
                slot_split: int = 1, seq_axes: tuple[str, ...] = (), seq_split: int = 1, error=InputError) -> None:
    """Raises `error` (naming the field and the multiple to use) unless the cache splits as a mesh would split
    it: slots over the slot_axes (slot_split devices), every slot's positions over the seq_axes (seq_split
    devices) in whole packed rows (position_alignment), and a paged cache's pages over both, whole pages on
    each sequence shard. lane_padded (the Pallas TPU kernels) pages hold a multiple of 128 positions: the TPU
    indexer kernel reads keys through the page tables in blocks of 128 or more."""
    if slots % slot_split:
        raise error(f"slots: {slots} slots do not split over the mesh's batch axes {list(slot_axes)} "
                    f"({slot_split} devices); use a multiple of {slot_split}")
    align = position_alignment(cfg, quant, lane_padded)
    if max_len % (seq_split * align):
        raise error(f"max_len: {max_len} positions do not split over the cache's sequence axes {list(seq_axes)} "
                    f"({seq_split} devices{f' x {align} positions per packed row' if align > 1 else ''}); use a "
                    f"multiple of {seq_split * align}")
    if page_size is None:
        return
    if lane_padded and page_size % 128:
        raise error(f"page_size: the TPU indexer kernel reads the keys through the page tables in blocks of 128 "
                    f"positions or more; use a multiple of 128 (got {page_size})")
    if num_pages % (slot_split * seq_split):
        raise error(f"num_pages: {num_pages} pages do not split over the mesh's {slot_split} slot groups x "
                    f"{seq_split} sequence shards; use a multiple of {slot_split * seq_split}")
    if (max_len // page_size) % seq_split:
        raise error(f"max_len: {max_len} positions are not whole pages of {page_size} on each of the {seq_split} "
                    f"sequence shards; use a multiple of {seq_split * page_size}")


def cache_bytes(cache: KVCache) -> int:
    """Bytes of every buffer (a paged cache's table included)."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


def bytes_per_token(cfg: GlmMoeDsaConfig, *, mtp: bool, dtype=jnp.bfloat16, lane_padded: bool = False,
                    quant: Quant = "none", key_dtype=jnp.int8) -> int:
    """Cache bytes one token of one sequence occupies (of position_alignment tokens: packed rows hold several)."""
    n = position_alignment(cfg, quant, lane_padded)
    return cache_bytes(cache_shapes(cfg, 1, n, mtp=mtp, dtype=dtype, lane_padded=lane_padded, quant=quant,
                                    key_dtype=key_dtype)) // n


class Rows(NamedTuple):
    """Where a call's new tokens go. slots [B] int32 (the cache slot of each row) or None for every slot in
    order; start [B] int32: the slot's length before the call (the first new token's position); count [B]
    int32: how many of the T new tokens are real (the rest are padding: written, never valid); pages [B, S /
    page] int32: the page-table rows of the call's slots (a paged cache; `on`), else None."""

    slots: jax.Array | None
    start: jax.Array
    count: jax.Array
    pages: jax.Array | None = None

    def on(self, cache: KVCache) -> Rows:
        """These rows with their page-table rows when `cache` is paged."""
        return self._replace(pages=self.take(cache.pages)) if cache.paged else self

    def positions(self, T: int) -> jax.Array:
        """[B,T] int32 cache positions (= token indices) of the new tokens."""
        return self.start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

    def key_valid(self, S: int) -> jax.Array:
        """[B,S] bool: the keys that exist after this call."""
        return jnp.arange(S, dtype=jnp.int32)[None, :] < (self.start + self.count)[:, None]

    def take(self, buf):
        """buf [B_all, S, ...] (or QuantizedRows) -> [B, S, ...] for this call's rows."""
        return buf if self.slots is None else take_rows(buf, self.slots)


def _scatter(buf, index: tuple, rows: Rows, new: jax.Array):
    """buf[*index, slot_b, start_b + t] = new[b, t] (positions past the end are dropped: a last prefill chunk's
    padding, or a verification at the end of a slot). new [B, T, D]; a QuantizedRows buf gets the rows
    quantized."""
    if isinstance(buf, QuantizedRows):
        if buf.sequence_packed:
            values, scale = quantize(new, jnp.int8)
            return QuantizedRows(_scatter_grouped(buf.values, index, rows, values, 4, unpack_sequence, pack_sequence),
                                 _scatter(buf.scale, index, rows, scale))
        parts = quantize_rows(new, buf.quantized_dims, buf.values.dtype, None if buf.tail is None else buf.tail.dtype)
        tail, n = buf.tail, buf.tail_fold
        if n > 1:
            tail = _scatter_grouped(tail, index, rows, parts.tail, n, lambda x: unfold_rows(x, n),
                                    lambda x: fold_rows(x, n))
        elif tail is not None:
            tail = _scatter(tail, index, rows, parts.tail)
        return QuantizedRows(_scatter(buf.values, index, rows, parts.values),
                             _scatter(buf.scale, index, rows, parts.scale), tail)
    new = new.astype(buf.dtype)
    if new.ndim == 3 and new.shape[-1] < buf.shape[-1]:  # lane padding
        new = jnp.pad(new, ((0, 0), (0, 0), (0, buf.shape[-1] - new.shape[-1])))
    return buf.at[_address(buf, index, rows, rows.positions(new.shape[1]))].set(new, mode="drop")


def _address(buf, index: tuple, rows: Rows, pos: jax.Array) -> tuple:
    """The index into buf of rows [B, n] of the call's slots at row positions pos [B, n] (rows of buf: token
    positions, or the packed rows of a buffer holding several positions per row). Out of bounds where a paged
    slot has no page there or pos is past the table: a scatter drops those rows."""
    if rows.pages is None:
        slots = jnp.arange(pos.shape[0], dtype=jnp.int32) if rows.slots is None else rows.slots
        return index + (slots[:, None], pos)
    # Paged: (page, row in page) through the table; no page (-1) or past the table: out of bounds.
    num_pages, page = buf.shape[len(index)], buf.shape[len(index) + 1]
    logical = pos // page
    ids = jnp.take_along_axis(rows.pages, jnp.minimum(logical, rows.pages.shape[1] - 1), axis=1)
    ids = jnp.where((logical < rows.pages.shape[1]) & (ids >= 0), ids, num_pages)
    return index + (ids, pos % page)


def _scatter_grouped(buf, index: tuple, rows: Rows, new: jax.Array, n: int, unpack, pack):
    """_scatter for a buffer whose rows each hold n consecutive positions (int8 keys packed in uint32 words,
    n = 4; a folded rope tail, n = 128 / p), new [B, T, ...] in the unpacked form. unpack: [B, m, ...stored]
    -> [B, n m, ...]; pack its inverse. The stored rows the new rows touch are read, their new positions
    replaced, and written back whole: positions before start_b keep their values."""
    T = new.shape[1]
    m = (T + 2 * n - 2) // n  # the most stored rows T consecutive positions can touch (from any offset)
    first = (rows.start // n)[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]  # [B, m]
    at = _address(buf, index, rows, first)
    old = unpack(buf.at[at].get(mode="fill", fill_value=0))  # [B, n m, ...]
    t = (n * first)[:, :, None] + jnp.arange(n, dtype=jnp.int32) - rows.start[:, None, None]
    t = t.reshape(t.shape[0], n * m)  # each unpacked position's index among the new rows
    ours = jnp.take_along_axis(new, jnp.clip(t, 0, T - 1).reshape(*t.shape, *(1,) * (new.ndim - 2)), axis=1)
    inside = ((t >= 0) & (t < T)).reshape(*t.shape, *(1,) * (new.ndim - 2))
    return buf.at[at].set(pack(jnp.where(inside, ours, old)), mode="drop")


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
        ik = None
        if proj.index_keys is not None:
            self.index_keys = _scatter(self.index_keys, self.keys_index, rows, proj.index_keys)
            ik = take_rows(self.index_keys, self.keys_index)
        return read_keys(take_rows(self.latent, self.latent_index), ik, rows, self.width)


def read_keys(latent, index_keys, rows: Rows, width: int) -> Keys:
    """One layer's buffers (latent [B_all, S, W] and index keys [B_all, S, DI] or None; or their pools [P,
    page, ...] with rows.pages) -> the Keys the call's rows attend over: their slots' rows (lane padding cut to
    `width` for the kernels that do not take it), or the pools as [1, P * page, ...] with the page tables."""
    if rows.pages is not None:
        S = rows.pages.shape[1] * latent.shape[1]  # pages per slot x page size
        pool = lambda a: a.reshape(1, a.shape[0] * a.shape[1], *a.shape[2:])  # noqa: E731
        latent = jax.tree.map(pool, latent)
        index_keys = None if index_keys is None else jax.tree.map(pool, index_keys)
    else:
        latent, index_keys = rows.take(latent), None if index_keys is None else rows.take(index_keys)
        S = latent.shape[1]
    if latent.shape[-1] != width:  # the kernels that take the lane-padded width are given it as is
        if isinstance(latent, QuantizedRows):
            latent = latent._replace(tail=latent.tail[..., :width - latent.quantized_dims])
        else:
            latent = latent[..., :width]
    return Keys(latent, index_keys, rows.key_valid(S), rows.pages)
