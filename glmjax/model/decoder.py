"""Decoder layers, IndexShare groups, and the scanned layer stack.

An IndexShare group is a "full" layer (it runs the indexer) followed by the "shared" layers that reuse its
top-k. Consecutive groups with the same structure form a segment; a segment's groups are stacked (leading
"layers" axis) and run with `lax.scan`, so compile time does not grow with depth. GLM-5.2 has three
segments: layers [0], [1] (dense, full) as one scanned pair, [2 | 3 4 5] (a dense full layer and three MoE
shared layers) as a single group, and 18 groups [full | shared shared shared] of MoE layers.

The scanned group body returns auxiliary outputs per layer (MoE loads and scores, the indexer's KL terms),
stacked by the scan, and takes a named rematerialisation policy (ModelOptions.remat).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import CacheUpdate, Keys, MLAttention, SequenceInfo, dense_indexer_loss
from glmjax.model.layers import RMSNorm
from glmjax.model.mlp import MLP
from glmjax.model.moe import MoE, MoEStats
from glmjax.model.options import ModelOptions
from glmjax.sharding import constrain, residual


@dataclasses.dataclass(frozen=True)
class LayerKind:
    mlp: str  # "dense" | "sparse"
    full_indexer: bool


@dataclasses.dataclass(frozen=True)
class Segment:
    """`num_groups` stacked groups of identical structure `kinds`; HF layer i = first_layer + g*len(kinds) + j."""

    first_layer: int
    num_groups: int
    kinds: tuple[LayerKind, ...]

    @property
    def group_size(self) -> int:
        return len(self.kinds)

    def hf_layer(self, group: int, position: int) -> int:
        return self.first_layer + group * self.group_size + position


def plan_segments(cfg: GlmMoeDsaConfig, scan_layers: bool = True) -> tuple[Segment, ...]:
    """Splits the layer schedule into IndexShare groups, then runs of identical groups (scan_layers=False:
    every group a segment of its own; ModelOptions.scan_layers)."""
    kinds = [LayerKind(m, t == "full") for m, t in zip(cfg.mlp_schedule, cfg.indexer_schedule, strict=True)]
    groups: list[tuple[int, tuple[LayerKind, ...]]] = []
    for i, kind in enumerate(kinds):
        if kind.full_indexer or not groups:
            groups.append((i, (kind,)))
        else:
            start, ks = groups[-1]
            groups[-1] = (start, ks + (kind,))
    segments: list[Segment] = []
    for start, ks in groups:
        last = segments[-1] if segments else None
        if scan_layers and last is not None and last.kinds == ks:
            segments[-1] = dataclasses.replace(last, num_groups=last.num_groups + 1)
        else:
            segments.append(Segment(start, 1, ks))
    return tuple(segments)


class GroupAux(NamedTuple):
    """Auxiliary outputs of one IndexShare group.

    moe: MoEStats stacked over the group's MoE layers (leading axis; None when it has none).
    indexer_kl: [] sum over valid queries of KL(p || softmax(index_logits)) at the full layer's selected keys,
      p being the head-summed attention of every layer of the group, averaged and L1-normalised
      (IndexShare's training-aware target); indexer_tokens: [] how many queries were summed. Zeros unless
      ModelOptions.indexer_loss."""

    moe: MoEStats | None
    indexer_kl: jax.Array
    indexer_tokens: jax.Array


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); x [B,T,D]."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, kind: LayerKind, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, axis="norm", param_dtype=opts.param_dtype)
        self.self_attn = MLAttention(cfg, opts, full_indexer=kind.full_indexer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, axis="norm", param_dtype=opts.param_dtype)
        if kind.mlp == "sparse":
            self.mlp = MoE(cfg, opts, rngs=rngs)
        else:
            self.mlp = MLP(D, cfg.intermediate_size, opts, std=cfg.initializer_range, rngs=rngs)

    def __call__(self, x: jax.Array, info: SequenceInfo, topk: jax.Array | None, keys: Keys | None = None,
                 shared_latent: jax.Array | None = None, update: CacheUpdate | None = None):
        """-> (x [B,T,D], topk [B,T,K], AttentionAux, MoEStats or None). keys, shared_latent, update: see
        MLAttention.attend and MLAttention.__call__."""
        # The residual stream is split over the sequence on the tensor axis too (sharding.residual); the
        # normed input is gathered for attention, whose heads are split over tensor instead.
        x = checkpoint_name(residual(x), "layer_input")
        h = constrain(self.input_layernorm(x), ("batch", "seq", "act_embed"))
        a, topk, attn_aux = self.self_attn(h, info, topk, keys, shared_latent, update)
        x = residual(x + checkpoint_name(residual(a), "attention_out"))
        h = self.post_attention_layernorm(x)
        stats = None
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(h, info.valid)  # splits its tokens over tensor as the residual stream does
        else:
            y = self.mlp(constrain(h, ("batch", "seq", "act_embed")))
        return residual(x + residual(y)), topk, attn_aux, stats


def remat_layer(layer: DecoderLayer, remat: str, x, info: SequenceInfo, topk, keys: Keys | None = None,
                shared_latent: jax.Array | None = None, update: CacheUpdate | None = None):
    """layer(x, info, topk, keys, shared_latent, update), as its own checkpoint unless remat is "none": the
    backward then recomputes and holds one layer's intermediates at a time (LAYER_REMAT_POLICY says what it
    keeps). A cache update (inference) runs without remat."""
    if remat == "none" or update is not None:
        return layer(x, info, topk, keys, shared_latent, update)
    graphdef, state = nnx.split(layer)

    def run(state, x, info, topk, keys, shared_latent):
        return nnx.merge(graphdef, state)(x, info, topk, keys, shared_latent)

    # prevent_cse: in a group's backward, the group's recomputed forward and each layer's own recompute
    # would otherwise be merged, keeping every layer's intermediates (queries, gathered inputs) alive
    # until its backward: 4x the memory of one layer in a GLM-5.2 group.
    return jax.checkpoint(run, policy=LAYER_REMAT_POLICY[remat], prevent_cse=True)(
        state, x, info, topk, keys, shared_latent)


def indexer_kl(probs: list[jax.Array], index_logits: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """probs: head-summed attention [B,T,K] of each layer sharing the top-k; index_logits [B,T,K] (-inf in
    empty slots); valid [B,T] -> (sum over valid queries of KL(p || softmax(index_logits)), their count)."""
    p = jax.lax.stop_gradient(sum(probs) / len(probs))
    total = jnp.sum(p, axis=-1, keepdims=True)
    ok = valid & (total[..., 0] > 0)
    p = p / jnp.where(total > 0, total, 1.0)
    logq = jax.nn.log_softmax(jnp.where(ok[..., None], index_logits, 0.0), axis=-1)
    terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0)
    kl = jnp.sum(terms, axis=-1)
    return jnp.sum(jnp.where(ok, kl, 0.0)), jnp.sum(ok).astype(jnp.float32)


def group_dense_kl(full_layer: DecoderLayer, targets, info: SequenceInfo) -> tuple[jax.Array, jax.Array]:
    """indexer_kl for the dense warm-up: over every allowed key, from each layer's DenseTarget (the first
    is the full layer's), blockwise (attention.dense_indexer_loss)."""
    attn = full_layer.self_attn
    return dense_indexer_loss(targets, info, scale=attn.scale, index_scale=attn.cfg.index_head_dim**-0.5,
                              q_block=attn.opts.q_block)


class LayerGroup(nnx.Module):
    """One IndexShare group: the full layer, then the shared layers reusing its top-k."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, kinds: tuple[LayerKind, ...], *,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, opts, k, rngs=rngs) for k in kinds])
        self.remat = opts.remat

    def __call__(self, x: jax.Array, info: SequenceInfo) -> tuple[jax.Array, GroupAux]:
        topk, probs, logits, dense, stats = None, [], None, [], []
        for layer in self.layers:
            x, topk, attn_aux, moe_stats = remat_layer(layer, self.remat, x, info, topk)
            if attn_aux.index_logits is not None:
                logits = attn_aux.index_logits
            if attn_aux.probs is not None:
                probs.append(attn_aux.probs)
            if attn_aux.dense is not None:
                dense.append(attn_aux.dense)
            if moe_stats is not None:
                stats.append(moe_stats)
        moe = jax.tree.map(lambda *s: jnp.stack(s), *stats) if stats else None
        if probs:
            kl, n = indexer_kl(probs, logits, info.valid)
        elif dense:
            kl, n = group_dense_kl(self.layers[0], dense, info)
        else:
            kl = n = jnp.zeros((), jnp.float32)
        return x, GroupAux(moe, kl, n)


# Remat at two levels (ModelOptions.remat): every decoder layer is a checkpoint that saves what
# LAYER_REMAT_POLICY allows, so a group's backward holds one layer's intermediates at a time; with "nothing"
# the scanned group body is a checkpoint too, so the scan keeps only each group's input (GLM-5.2: 21 saved
# [B, T, D] arrays instead of 79), at the price of recomputing the group's forward once more.
LAYER_REMAT_POLICY = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "layer_input": jax.checkpoint_policies.nothing_saveable,  # the layer's input is the checkpoint's input
    "attention": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
GROUP_REMAT_POLICY = {"nothing": jax.checkpoint_policies.nothing_saveable}


def unstack(state):
    """The state of a one-group stack without its leading axis of 1 (a reshape: no copy)."""
    return jax.tree.map(lambda a: a[0], state)


class LayerStack(nnx.Module):
    """A segment: `num_groups` LayerGroups with stacked parameters, run by lax.scan."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, segment: Segment, *, rngs: nnx.Rngs):
        self.segment = segment
        self.remat = opts.remat

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(r: nnx.Rngs) -> LayerGroup:
            return LayerGroup(cfg, opts, segment.kinds, rngs=r)

        self.groups = make(rngs.split(segment.num_groups))

    def __call__(self, x: jax.Array, info: SequenceInfo) -> tuple[jax.Array, GroupAux]:
        """x [B,T,D] -> (x, GroupAux with a leading [num_groups] axis on every field)."""
        graphdef, state = nnx.split(self.groups)
        if self.segment.num_groups == 1:  # unscanned (ModelOptions.scan_layers=False): no loop, no slicing
            x, aux = nnx.merge(graphdef, unstack(state))(x, info)
            return x, jax.tree.map(lambda a: a[None], aux)

        def body(h, group_state):
            return nnx.merge(graphdef, group_state)(h, info)

        if self.remat in GROUP_REMAT_POLICY:
            body = jax.checkpoint(body, policy=GROUP_REMAT_POLICY[self.remat], prevent_cse=False)
        return jax.lax.scan(body, x, state)
