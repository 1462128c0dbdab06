"""The whole model with attention_impl="pallas*" (kernels in interpret mode on CPU) against "reference"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from tests.conftest import GOLDEN


def load(name, impl):
    return glmjax.load_pretrained(GOLDEN / name, options=glmjax.ModelOptions(q_block=16, attention_impl=impl,
                                                                           interpret=impl != "reference"))


def inputs(name):
    g = np.load(GOLDEN / f"{name}.npz")
    return g, [jnp.asarray(g[k]) for k in ("input_ids", "attention_mask", "position_ids")]


@pytest.mark.parametrize("name,impl", [
    ("indexshare_freq", "pallas_tpu"), ("indexshare_pattern", "pallas_tpu"), ("allfull_nomtp", "pallas_tpu"),
    ("fp8", "pallas_tpu"), ("indexshare_freq", "pallas_gpu"), ("indexshare_freq", "pallas"),
])
def test_pallas_model_matches_reference_and_transformers(name, impl):
    g, args = inputs(name)
    real = g["attention_mask"].astype(bool)
    out = nnx.jit(lambda m, *a: m(*a))(load(name, impl), *args)
    np.testing.assert_allclose(np.asarray(out.logits)[real], g["logits"][real], atol=1e-4)
    if "mtp_logits" in g:
        np.testing.assert_allclose(np.asarray(out.mtp_logits)[real[:, :-1]], g["mtp_logits"][real[:, :-1]],
                                   atol=1e-4)


def _loss_and_grads(model, ids, mask, pos):
    def loss_fn(model):
        out = model(ids, mask, pos)
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    return nnx.jit(nnx.value_and_grad(loss_fn))(model)


@pytest.fixture(scope="module")
def reference_grads():
    """The reference model's loss and gradients, computed once for both kernel families."""
    _, args = inputs("indexshare_freq")
    return _loss_and_grads(load("indexshare_freq", "reference"), *args)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_model_gradients_match_reference(impl, reference_grads):
    _, args = inputs("indexshare_freq")
    loss_ref, g_ref = reference_grads
    loss, g = _loss_and_grads(load("indexshare_freq", impl), *args)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    flat_ref = dict(nnx.to_flat_state(g_ref))
    flat = dict(nnx.to_flat_state(g))
    assert flat.keys() == flat_ref.keys()
    for path, v in flat_ref.items():
        a, b = np.asarray(flat[path][...]), np.asarray(v[...])
        np.testing.assert_allclose(a, b, atol=1e-5 + 1e-3 * np.abs(b).max(), err_msg=str(path))
    # The indexer learns only from its own loss: no LM gradient reaches it.
    indexer = [np.abs(np.asarray(v[...])).max() for p, v in flat_ref.items() if "indexer" in p]
    assert indexer and max(indexer) == 0.0


def test_unsupported_shape_is_an_error_not_a_fallback():
    # indexshare_pattern has an 8-dim rope part: the Triton kernels need power-of-two tiles >= 16.
    _, args = inputs("indexshare_pattern")
    with pytest.raises(ValueError, match="powers of two"):
        load("indexshare_pattern", "pallas_gpu")(*args)
