"""The model on 8 CPU devices: every mesh gives the unsharded logits, MTP logits and gradients, and so does
every remat policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.model.options import REMAT_POLICIES
from glmjax.sharding import logical_to_spec, make_mesh, shard_model
from tests.conftest import three_layer_indexshare_config

B, T = 8, 32


def tiny_model(impl="reference", **opts):
    cfg = three_layer_indexshare_config()  # 3 layers (dense, MoE; full and shared indexers), MTP, n_group 4
    options = glmjax.ModelOptions(attention_impl=impl, interpret=impl != "reference", q_block=16, **opts)
    return glmjax.GlmMoeDsa(cfg, options, rngs=nnx.Rngs(0))


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 160, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0  # left padding
    mask[6, :11] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def loss_fn(model, ids, mask):
    out = model(ids, mask)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mlogp = jax.nn.log_softmax(out.mtp_logits[:, :-1], axis=-1)
    mnll = -jnp.take_along_axis(mlogp, ids[:, 2:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(jnp.float32)
    loss = jnp.sum(nll * m) / jnp.sum(m) + 0.3 * jnp.sum(mnll * m[:, 1:]) / jnp.sum(m[:, 1:])
    return loss, out


def run(model, ids, mask, mesh=None):
    step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    if mesh is None:
        return step(model, ids, mask)
    shard_model(model, mesh)
    spec = logical_to_spec(("batch", "seq"), ids.shape, mesh=mesh)
    ids, mask = (jax.device_put(a, jax.NamedSharding(mesh, spec)) for a in (ids, mask))
    with jax.set_mesh(mesh):
        return step(model, ids, mask)


def assert_same(got, want):
    (loss, out), grads = got
    (loss_ref, out_ref), grads_ref = want
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    real = np.asarray(batch()[1]).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(out_ref.logits)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits)[real[:, :-1]],
                               np.asarray(out_ref.mtp_logits)[real[:, :-1]], atol=1e-5)
    flat, flat_ref = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_ref))
    assert flat.keys() == flat_ref.keys()
    for path, v in flat_ref.items():
        a, b = np.asarray(flat[path][...]), np.asarray(v[...])
        np.testing.assert_allclose(a, b, atol=1e-5 + 1e-4 * np.abs(b).max(), err_msg=str(path))


MESHES = {
    "data2_tensor4": {"data": 2, "tensor": 4},
    "fsdp2_expert4": {"fsdp": 2, "expert": 4},
    "context4_tensor2": {"context": 4, "tensor": 2},
    "all_axes": {"data": 1, "fsdp": 1, "context": 2, "expert": 2, "tensor": 2},
}

_reference_cache = {}


def reference(impl):
    if impl not in _reference_cache:
        _reference_cache[impl] = run(tiny_model(impl), *batch())
    return _reference_cache[impl]


# Each remat policy runs on one of the reference impl's meshes: a policy must leave the loss, outputs and
# gradients unchanged, sharded or not, so one sharded step per policy, checked against the unsharded step
# without remat, covers it (an unsharded step per policy would be three more compiles). Every mesh also runs
# without remat, under pallas_tpu (the same model code outside attention); all_axes under both impls. The
# pallas_tpu runs of the one-split meshes are in `-m slow` (suite time): all_axes splits heads, context and
# experts under the kernels at once.
REMAT_ON_MESH = {"data2_tensor4": "nothing", "fsdp2_expert4": "layer_input", "context4_tensor2": "attention",
                 "all_axes": "none"}
CASES = [("reference", m, REMAT_ON_MESH[m]) for m in MESHES] + [
    ("pallas_tpu", m, "none") if m == "all_axes" else pytest.param("pallas_tpu", m, "none", marks=pytest.mark.slow)
    for m in MESHES]


IDS = ["{}-{}-remat_{}".format(*getattr(c, "values", c)) for c in CASES]  # a pytest.param keeps its in .values


@pytest.mark.parametrize("impl,mesh_name,remat", CASES, ids=IDS)
def test_mesh_matches_unsharded(impl, mesh_name, remat):
    mesh = make_mesh(MESHES[mesh_name])
    assert_same(run(tiny_model(impl, remat=remat), *batch(), mesh=mesh), reference(impl))


def test_pallas_matches_reference_unsharded():
    (loss, out), _ = reference("pallas_tpu")
    (loss_ref, out_ref), _ = reference("reference")
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(out_ref.logits), atol=1e-5)


def test_every_remat_policy_is_checked():
    assert {r for i, _, r in CASES if i == "reference"} == set(REMAT_POLICIES)  # (the slow ones are pallas_tpu)


def test_context_axis_must_divide_the_sequence():
    ids = jnp.zeros((B, 36), jnp.int32)  # divisible by context 4, not by the 2 * 4 load-balanced chunks
    with pytest.raises(ValueError, match="divisible by 2 \\* context"):
        run(tiny_model(), ids, jnp.ones_like(ids), mesh=make_mesh({"context": 4, "tensor": 2}))


def test_dense_warmup_kl_on_a_mesh():
    """The dense warm-up on 8 devices (dense attention, each indexer's KL over every key per IndexShare group,
    queries split over context x tensor with whole heads; remat) gives the single device's sparse-stage KL
    terms and gradients with a top-k that keeps every key (index_topk >= T): for the groups' indexers and the
    MTP layer's, on packed documents with padding. The KL trains the indexers alone."""
    ids, mask = batch()
    segments = jnp.where(jnp.arange(T) < 13, 1, 2)[None].repeat(B, 0) * mask

    def kl_grad(model, mesh=None):
        def total(m, ids, segments):
            out = m.backbone(ids, segment_ids=segments)
            kl = jnp.concatenate([out.aux.indexer_kl, out.mtp_aux.indexer_kl[:1]])
            n = jnp.concatenate([out.aux.indexer_tokens, out.mtp_aux.indexer_tokens[:1]])
            return jnp.sum(kl), (kl, n)

        step = nnx.jit(nnx.grad(total, has_aux=True))
        if mesh is None:
            return step(model, ids, segments)
        shard_model(model, mesh)
        spec = jax.NamedSharding(mesh, logical_to_spec(("batch", "seq"), ids.shape, mesh=mesh))
        with jax.set_mesh(mesh):
            return step(model, jax.device_put(ids, spec), jax.device_put(segments, spec))

    cfg = three_layer_indexshare_config().replace(initializer_range=0.3)  # peaked attention: a KL to learn
    common = dict(q_block=16, indexer_loss=True)
    every_key = glmjax.GlmMoeDsa(cfg.replace(index_topk=T), glmjax.ModelOptions(**common), rngs=nnx.Rngs(0))
    dense = glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(dense_attention=True, remat="nothing", **common),
                             rngs=nnx.Rngs(0))
    grads_ref, (kl_ref, n_ref) = kl_grad(every_key)
    grads, (kl, n) = kl_grad(dense, make_mesh(MESHES["all_axes"]))
    np.testing.assert_array_equal(n, n_ref)
    assert len(kl_ref) == 3 and np.all(np.asarray(kl_ref) > 0)
    np.testing.assert_allclose(kl, kl_ref, rtol=2e-5)
    flat, flat_ref = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_ref))
    trained = set()
    for path, v in flat_ref.items():
        a, b = np.asarray(flat[path][...]), np.asarray(v[...])
        np.testing.assert_allclose(a, b, atol=1e-6 + 1e-4 * np.abs(b).max(), err_msg=str(path))
        if np.abs(a).max() > 0:
            trained.add(path)
    assert trained and all("indexer" in map(str, path) for path in trained), sorted(trained)
