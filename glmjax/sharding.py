"""Mesh construction and the one table that maps logical axis names to mesh axes.

Model code names the axes of every parameter (`logical_axes` metadata) and of its main activations
(`constrain(x, ("batch", "seq", "embed"))`); nothing else in glmjax mentions mesh axes. A stacked
(scanned) parameter has more dims than names: the leading extra dims are the "layers" axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "expert", "tensor")

# logical axis -> mesh axes (a tuple shards one dim over several mesh axes, in order).
DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    # activations. Outside the MoE the expert axis is one more data-parallel axis; context splits the sequence.
    "batch": ("data", "fsdp", "expert"),
    "seq": ("context",),
    # A serving KV cache's sequence axis (sequence-sharded decoding), and the page axis of a paged cache's
    # pools (each slot group's pages with its slots); glmjax.serve.engine.serve_rules.
    "kv_seq": ("context",),
    "kv_pages": ("data", "fsdp", "expert"),
    # The residual stream between sublayers also splits the sequence over tensor (sequence parallelism):
    # tensor-parallel sublayers gather it at entry and reduce-scatter their output, so the saved layer
    # inputs and the residual adds take 1/tensor of the memory of a tensor-replicated stream.
    "res_seq": ("context", "tensor"),
    "act_heads": ("tensor",),
    "act_index_heads": ("tensor",),
    "act_embed": (),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters: fully sharded (FSDP) over every axis that does not split them otherwise.
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp", "context", "expert"),
    "heads": ("tensor",),
    "index_heads": ("tensor",),
    "head_dim": (),
    "index_head_dim": (),
    "q_lora": (),
    "kv_lora": (),
    "latent": (),
    "mlp": ("tensor",),
    # Routed experts are split whole over expert x tensor (expert parallelism of up to 16-64 devices for
    # GLM-5.2's 256 experts); the MoE splits its tokens over tensor too, so no psum of [tokens, D] is needed.
    "moe_mlp": (),
    "experts": ("expert", "tensor"),
    "norm": (),
    "mtp_in": ("fsdp", "context", "expert"),
}

_RULES: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar(
    "glmjax_sharding_rules", default=DEFAULT_RULES
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES; axes missing from `shape` get size 1. Example: make_mesh({"fsdp": 4, "tensor": 2})."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"make_mesh: unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(sizes)
    if n != len(devices):
        raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {n} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


@contextlib.contextmanager
def logical_rules(rules: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
    """Overrides DEFAULT_RULES within the block (trace time)."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, *, mesh=None,
                    rules: Mapping[str, tuple[str, ...]] | None = None, what: str = "array") -> PartitionSpec:
    """PartitionSpec for logical axis names. Mesh axes absent from (or of size 1 in) `mesh` are dropped; a
    mesh axis is used at most once per array. With `shape`, a dim that the mesh axes do not divide is an error."""
    rules = _RULES.get() if rules is None else rules
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"sharding: no rule for logical axis {name!r} (of {what})")
        mesh_axes = [a for a in rules[name] if a not in used and (sizes is None or sizes.get(a, 1) > 1)]
        if shape is not None and sizes is not None and mesh_axes:
            n = math.prod(sizes[a] for a in mesh_axes)
            if shape[i] % n:
                raise ValueError(
                    f"sharding: dim {i} ({name!r}, size {shape[i]}) of {what} is not divisible by mesh axes "
                    f"{mesh_axes} (size {n}); change the mesh or the rule for {name!r}"
                )
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def param_sharding(variable: nnx.Variable, mesh: Mesh, rules=None, what: str = "parameter") -> NamedSharding:
    """NamedSharding of one parameter. A stacked (scanned) parameter has more dims than logical names: its
    leading dims are "layers"."""
    shape = tuple(variable.shape)
    meta = variable.get_metadata()
    if "logical_axes" not in meta:
        raise ValueError(f"sharding: {what} has no logical_axes metadata; every parameter must name its axes")
    axes = tuple(meta["logical_axes"])
    axes = ("layers",) * (len(shape) - len(axes)) + axes
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh=mesh, rules=rules, what=what))


# Every model variable is placed by its logical axes: parameters and the non-trainable ones (the router's
# correction bias) alike; RNG state is not model data.
MODEL_VARIABLES = nnx.Not(nnx.RngState)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.State:
    """A state-shaped tree of NamedShardings for every variable of `model` (abstract models work too)."""
    return jax.tree.map_with_path(
        lambda path, v: param_sharding(v, mesh, rules, "/".join(str(p) for p in path)),
        nnx.state(model, MODEL_VARIABLES), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Places every variable of `model` on `mesh` according to the logical rules (in place; returns model)."""
    shardings = param_shardings(model, mesh, rules)
    state = nnx.state(model, MODEL_VARIABLES)
    nnx.update(model, jax.device_put(state, shardings))
    return model


# Parameter dims split only to save memory (FSDP): gathered whole where the parameter is used.
GATHERED_AT_USE = frozenset({"embed", "mtp_in"})


def gathered(variable: nnx.Variable, dtype=None) -> jax.Array:
    """The variable's value (cast to `dtype` first, so float32 master weights travel as bfloat16) with its
    FSDP dims (GATHERED_AT_USE) all-gathered; other dims keep their split.

    Stating this at every use makes the FSDP pattern explicit: without it XLA may instead keep the weight
    split and move the activations, whose token dim is split over the same mesh axes; in the backward of
    the 753B step that materialised every device's tokens on each device (a [devices, tokens, D] buffer)."""
    value = variable[...]
    if dtype is not None:
        value = value.astype(dtype)
    mesh = current_mesh()
    if mesh is None:
        return value
    axes = tuple(variable.get_metadata()["logical_axes"])
    axes = ("layers",) * (value.ndim - len(axes)) + axes
    use = tuple(None if a in GATHERED_AT_USE else a for a in axes)
    return jax.lax.with_sharding_constraint(value, logical_to_spec(use, mesh=mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op unless a mesh is set (`jax.set_mesh`)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, None, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def residual(x: jax.Array) -> jax.Array:
    """Constrains the residual stream x [B,T,D] to ("batch", "res_seq", "act_embed"); when T does not divide
    over res_seq (a decode step's few tokens) to ("batch", "seq", "act_embed"), the layout of the sublayers."""
    mesh = current_mesh()
    if mesh is None:
        return x
    n = mesh_size(mesh_axes("res_seq", mesh), mesh)
    return constrain(x, ("batch", "res_seq" if x.shape[1] % n == 0 else "seq", "act_embed"))


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh` (abstract inside jit), or None when the model runs unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def mesh_axes(name: str, mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that logical axis `name` is split over on `mesh` (empty without a mesh)."""
    if mesh is None:
        return ()
    sizes = dict(mesh.shape)
    return tuple(a for a in _RULES.get()[name] if sizes.get(a, 1) > 1)


def mesh_size(axes: Sequence[str], mesh) -> int:
    return 1 if mesh is None else math.prod(dict(mesh.shape)[a] for a in axes)

