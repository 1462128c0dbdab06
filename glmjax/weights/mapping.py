"""Where each glmjax parameter lives in a Hugging Face checkpoint.

Module names inside a decoder layer are transformers' own (self_attn.q_a_proj, mlp.gate, ...), so the HF
key of a parameter is its path with the layer prefix. Three things differ and are handled here:
- stacking: a scanned segment stacks its groups on a leading axis (HF layer = segment.hf_layer(g, j)), and
  routed experts are stacked [E, ...] (HF keys mlp.experts.{e}.{gate,up,down}_proj.weight);
- layout: torch Linear weights are [out, in]; glmjax stores [in..., out...] with heads as their own axes;
- the MTP layer's decoder lives under `mtp.{i}.decoder`, in HF directly under model.layers.{L + i}.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from flax import nnx

from glmjax.model.moe import RouterBias
from glmjax.model.transformer import GlmMoeDsa

# The variables a checkpoint holds: the parameters and the router's correction bias (its own variable type,
# so that optimizers over nnx.Param leave it to the load balancer).
CHECKPOINT_VARS = nnx.Any(nnx.Param, RouterBias)

IDENTITY_OWNERS = {
    "input_layernorm", "post_attention_layernorm", "q_a_layernorm", "kv_a_layernorm", "k_norm", "norm",
    "enorm", "hnorm", "embed_tokens",
}
# Linear weights whose *input* spans two glmjax axes ([heads, v_head_dim] -> hidden).
TWO_INPUT_AXES = {"o_proj"}


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One glmjax parameter: `stack_shape` leading dims, each index naming one HF tensor of `leaf_shape`."""

    path: tuple
    shape: tuple[int, ...]
    dtype: np.dtype
    stack_shape: tuple[int, ...]
    keys: np.ndarray  # HF key per stack index, shape stack_shape (object array of str)
    linear: bool  # HF [out, in] -> W.T reshaped to leaf_shape
    n_in: int  # how many leading leaf dims are the input side (linear only)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        return self.shape[len(self.stack_shape):]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.linear:
            return self.leaf_shape
        leaf = self.leaf_shape
        return (math.prod(leaf[self.n_in:]), math.prod(leaf[: self.n_in]))

    def to_leaf(self, w: np.ndarray) -> np.ndarray:
        """HF tensor -> glmjax leaf layout."""
        return w.T.reshape(self.leaf_shape) if self.linear else w

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        """glmjax leaf -> HF tensor layout."""
        if not self.linear:
            return leaf
        n_in = math.prod(self.leaf_shape[: self.n_in])
        return leaf.reshape(n_in, -1).T


def _layer_suffix(path: tuple[str, ...]) -> tuple[str, bool, int]:
    """Path inside a decoder layer -> (HF key suffix with {e} for experts, linear?, n_in)."""
    names = [str(p) for p in path]
    leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
    if len(names) >= 2 and names[-2] == "experts":
        # mlp.experts.gate_proj (stacked [E, ...]) -> mlp.experts.{e}.gate_proj.weight
        return ".".join(names[:-1]) + ".{e}." + leaf + ".weight", True, 1
    linear = leaf == "weight" and owner not in IDENTITY_OWNERS
    return ".".join(names), linear, 2 if owner in TWO_INPUT_AXES else 1


def build_plans(model: GlmMoeDsa) -> list[ParamPlan]:
    """ParamPlans for every checkpointed variable of `model` (CHECKPOINT_VARS; an abstract model from
    nnx.eval_shape is enough)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    plans = []
    for path, var in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS)):
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        head = str(path[0])
        if head == "stacks":
            seg = model.segments[int(path[1])]
            # ("stacks", s, "groups", "layers", j, ...)
            j, rest = int(path[4]), tuple(path[5:])
            suffix, linear, n_in = _layer_suffix(rest)
            stack = (seg.num_groups,)
            layer_of = [seg.hf_layer(g, j) for g in range(seg.num_groups)]
        elif head == "mtp":
            i, rest = int(path[1]), tuple(path[2:])
            if rest[0] == "decoder":
                rest = rest[1:]
            suffix, linear, n_in = _layer_suffix(rest)
            stack = ()
            layer_of = [L + i]
        else:
            name = ".".join(str(p) for p in path)
            key = ("lm_head.weight" if head == "lm_head" else f"model.{name}")
            linear = head == "lm_head"
            plans.append(ParamPlan(path, shape, dtype, (), np.array(key, dtype=object), linear, 1))
            continue
        experts = "{e}" in suffix
        if experts:
            stack = stack + (cfg.n_routed_experts,)
        keys = np.empty(stack, dtype=object)
        for idx in np.ndindex(*stack):
            layer = layer_of[idx[0]] if head == "stacks" else layer_of[0]
            key = f"model.layers.{layer}." + suffix
            keys[idx] = key.replace("{e}", str(idx[-1])) if experts else key
        plans.append(ParamPlan(path, shape, dtype, stack, keys, linear, n_in))
    return plans


def iter_hf_keys(plans: list[ParamPlan]) -> Iterator[tuple[str, ParamPlan, tuple[int, ...]]]:
    """(HF key, plan, stack index) for every HF tensor the model needs."""
    for plan in plans:
        for idx in np.ndindex(*plan.stack_shape):
            yield str(plan.keys[idx]), plan, idx
