"""The tiny model on 8 CPU devices under two meshes gives the unsharded logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import glmjax
from glmjax.sharding import (
    DEFAULT_RULES,
    MODEL_VARIABLES,
    constrain,
    logical_rules,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
)
from tests.conftest import GOLDEN

MESHES = [
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"fsdp": 2, "expert": 4},
]


def forward(model, ids, mask, pos):
    return nnx.jit(lambda m, i, a, p: m(i, a, p))(model, ids, mask, pos)


@pytest.fixture(scope="module")
def golden():
    g = np.load(GOLDEN / "indexshare_freq.npz")
    # Batch 8 (the fixture's two rows, four times) so every mesh can shard the batch.
    return [jnp.tile(jnp.asarray(g[k]), (4, 1)) for k in ("input_ids", "attention_mask", "position_ids")]


@pytest.fixture(scope="module")
def unsharded(golden):
    """The unsharded forward, computed once for every mesh."""
    return forward(glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=glmjax.ModelOptions(q_block=16)),
                   *golden)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_equals_unsharded(mesh_shape, golden, unsharded):
    assert len(jax.devices()) == 8
    opts = glmjax.ModelOptions(q_block=16)
    ref = unsharded

    mesh = make_mesh(mesh_shape)
    model = shard_model(glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=opts), mesh)
    experts = model.stacks[1].groups.layers[1].mlp.experts.gate_proj
    if mesh_shape.get("expert", 1) > 1:
        assert "expert" in str(experts[...].sharding.spec)
    with jax.set_mesh(mesh):
        batch = [jax.device_put(x, jax.NamedSharding(mesh, logical_to_spec(("batch", None), x.shape, mesh=mesh)))
                 for x in golden]
        out = forward(model, *batch)
    assert len(out.logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits), np.asarray(ref.mtp_logits), atol=2e-5)


def test_every_parameter_has_logical_axes():
    cfg = glmjax.load_config(GOLDEN / "indexshare_freq")
    model = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, MODEL_VARIABLES)):
        axes = var.get_metadata().get("logical_axes")
        assert axes, path
        assert all(a in DEFAULT_RULES for a in axes), (path, axes)
    # Abstract models get shardings too (what a pod-scale init or load uses).
    shardings = param_shardings(model, make_mesh({"fsdp": 8}))
    assert len(jax.tree.leaves(shardings)) > 0


def test_logical_to_spec_rules():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("batch", "seq", "act_embed"), mesh=mesh) == PartitionSpec(("data", "fsdp"), None, None)
    assert logical_to_spec(("experts", "embed", "moe_mlp"), mesh=mesh) == PartitionSpec("tensor", "fsdp", None)
    mesh5 = make_mesh({"fsdp": 2, "context": 2, "expert": 2})
    assert logical_to_spec(("batch", "seq", "act_embed"), mesh=mesh5) == PartitionSpec(("fsdp", "expert"), "context",
                                                                                        None)
    assert logical_to_spec(("experts", "embed", "moe_mlp"), mesh=mesh5) == PartitionSpec("expert", ("fsdp", "context"),
                                                                                         None)
    with pytest.raises(ValueError, match="not divisible"):
        logical_to_spec(("embed",), (3,), mesh=mesh, what="w")
    with pytest.raises(KeyError, match="bogus"):
        logical_to_spec(("bogus",), mesh=mesh)
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"data": 3, "tensor": 2})
    x = jnp.ones((4, 4))
    assert constrain(x, ("batch", None)) is x  # no mesh set: no-op
    # Overriding the table for a block changes what logical names map to (activations use it at trace time).
    with logical_rules({**DEFAULT_RULES, "batch": ("data",)}):
        assert logical_to_spec(("batch",), mesh=mesh) == PartitionSpec("data")
    assert logical_to_spec(("batch",), mesh=mesh) == PartitionSpec(("data", "fsdp"))


def test_a_variable_without_logical_axes_is_an_error():
    mesh = make_mesh({"fsdp": 8})
    with pytest.raises(ValueError, match="no logical_axes"):
        glmjax.sharding.param_sharding(nnx.Param(jnp.ones((8, 4))), mesh, what="stray")
