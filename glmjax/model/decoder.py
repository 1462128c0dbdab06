"""Decoder layers, IndexShare groups, and the scanned layer stack.

An IndexShare group is a "full" layer (it runs the indexer) followed by the "shared" layers that reuse its
top-k. Consecutive groups with the same structure form a segment; a segment's groups are stacked (leading
"layers" axis) and run with `lax.scan`, so compile time does not grow with depth. GLM-5.2 has three
segments: layers [0], [1] (dense, full) as one scanned pair, [2 | 3 4 5] (a dense full layer and three MoE
shared layers) as a single group, and 18 groups [full | shared shared shared] of MoE layers.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from glmjax.config import GlmMoeDsaConfig
from glmjax.model.attention import MLAttention, SequenceInfo
from glmjax.model.layers import RMSNorm
from glmjax.model.mlp import MLP
from glmjax.model.moe import MoE
from glmjax.model.options import ModelOptions
from glmjax.sharding import constrain


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


def plan_segments(cfg: GlmMoeDsaConfig) -> tuple[Segment, ...]:
    """Splits the layer schedule into IndexShare groups, then runs of identical groups."""
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
        if last is not None and last.kinds == ks:
            segments[-1] = dataclasses.replace(last, num_groups=last.num_groups + 1)
        else:
            segments.append(Segment(start, 1, ks))
    return tuple(segments)


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

    def __call__(self, x: jax.Array, info: SequenceInfo, topk: jax.Array | None):
        a, topk = self.self_attn(self.input_layernorm(x), info, topk)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), topk


class LayerGroup(nnx.Module):
    """One IndexShare group: the full layer, then the shared layers reusing its top-k."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, kinds: tuple[LayerKind, ...], *,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, opts, k, rngs=rngs) for k in kinds])

    def __call__(self, x: jax.Array, info: SequenceInfo) -> jax.Array:
        topk = None
        for layer in self.layers:
            x, topk = layer(x, info, topk)
        return x


class LayerStack(nnx.Module):
    """A segment: `num_groups` LayerGroups with stacked parameters, run by lax.scan."""

    def __init__(self, cfg: GlmMoeDsaConfig, opts: ModelOptions, segment: Segment, *, rngs: nnx.Rngs):
        self.segment = segment

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(r: nnx.Rngs) -> LayerGroup:
            return LayerGroup(cfg, opts, segment.kinds, rngs=r)

        self.groups = make(rngs.split(segment.num_groups))

    def __call__(self, x: jax.Array, info: SequenceInfo) -> jax.Array:
        graphdef, state = nnx.split(self.groups)

        def body(h, group_state):
            return nnx.merge(graphdef, group_state)(h, info), None

        x, _ = jax.lax.scan(body, x, state)
        return x
