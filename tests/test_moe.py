"""MoE: the grouped matmul against a dense reference, the MoE against a per-token loop over experts, the
expert-parallel MoE on 8 CPU devices against the unsharded one (outputs, statistics, gradients), the
collectives' sizes in the compiled HLO, and the router bias as its own checkpointed variable type."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.model import moe as moe_module
from glmjax.model.moe import MoE, RouterBias
from glmjax.sharding import make_mesh
from glmjax.weights.mapping import CHECKPOINT_VARS
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from tests.conftest import GOLDEN, REPO

D, E, I = 32, 16, 16


def tiny_cfg(**kw):
    base = dict(hidden_size=D, n_routed_experts=E, moe_intermediate_size=I, num_experts_per_tok=4, n_group=4,
                topk_group=2, initializer_range=0.2)
    return glmjax.load_config(REPO / "configs" / "tiny-demo.json").replace(**{**base, **kw})


def make_moe(cfg, seed=0, gmm_impl=None, capacity_factor=2.0):
    opts = glmjax.ModelOptions(interpret=gmm_impl == "megablox", moe_gmm_impl=gmm_impl,
                               moe_capacity_factor=capacity_factor)
    moe = MoE(cfg, opts, rngs=nnx.Rngs(seed))
    moe.gate.e_score_correction_bias[...] = 0.3 * jax.random.normal(jax.random.key(seed + 1), (cfg.n_routed_experts,))
    return moe


# ------------------------------------------------------------------------------------------ grouped matmul


@pytest.mark.parametrize("impl,kw", [("tiled", dict(tile=16)), ("tiled", dict(tile=128)),
                                     ("megablox", dict(interpret=True)), ("ragged_dot", {})])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_grouped_matmul_matches_dense_reference(impl, kw, transpose_rhs):
    M, K, N = 200, 24, 40
    sizes = jnp.array([30, 0, 50, 1, 64, 20, 5], jnp.int32)  # empty groups, and 30 rows past every group
    lhs = jax.random.normal(jax.random.key(0), (M, K))
    rhs = jax.random.normal(jax.random.key(1), (7, N, K) if transpose_rhs else (7, K, N))
    ct = jax.random.normal(jax.random.key(2), (M, N))

    def run(f):
        y, vjp = jax.vjp(lambda a, b: f(a, b, sizes, transpose_rhs=transpose_rhs), lhs, rhs)
        return (y, *vjp(ct))

    got = run(lambda *a, **k: grouped_matmul(*a, impl=impl, **kw, **k))
    want = run(grouped_matmul_reference)
    for g, w, what in zip(got, want, ("out", "dlhs", "drhs"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-5, err_msg=what)
    assert not np.asarray(got[0][170:]).any() and not np.asarray(got[1][170:]).any()  # rows past the groups


@pytest.mark.parametrize("pv", [1, 3, 64])
def test_cpu_loop_batches_any_number_of_visits_per_step(pv):
    """The CPU loop's visits per step (pv, one batched product) change nothing: 1, a count that leaves a
    partial last step, and more than the plan's visits."""
    from pallas_kernels.grouped_matmul.cpu import gmm_tiled

    M, K, N = 200, 24, 40
    sizes = jnp.array([30, 0, 50, 1, 64, 20, 5], jnp.int32)
    lhs = jax.random.normal(jax.random.key(0), (M, K))
    rhs = jax.random.normal(jax.random.key(1), (7, K, N))
    ct = jax.random.normal(jax.random.key(2), (M, N))

    def run(f):
        y, vjp = jax.vjp(lambda a, b: f(a, b), lhs, rhs)
        return (y, *vjp(ct))

    got = run(lambda a, b: gmm_tiled(a, b, sizes, 16, False, jnp.float32, pv))
    want = run(lambda a, b: grouped_matmul_reference(a, b, sizes))
    for g, w, what in zip(got, want, ("out", "dlhs", "drhs"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-5, err_msg=what)


def test_grouped_matmul_rejects_bad_arguments():
    x, w, s = jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2], jnp.int32)
    with pytest.raises(ValueError, match="not one of"):
        grouped_matmul(x, w, s, impl="bogus")
    with pytest.raises(ValueError, match="interpret"):
        grouped_matmul(x, w, s, impl="tiled", interpret=True)
    with pytest.raises(ValueError, match="contraction"):
        grouped_matmul(x, w, s, transpose_rhs=True)


# ---------------------------------------------------------------------------------- unsharded vs a loop


def dense_reference(cfg, moe, x, valid):
    """float64 numpy: route each token, then loop over experts applying each to the tokens that chose it.
    -> (y [B,T,D], load [E], seq_load [B,E], seq_score [B,E])."""
    B, T, _ = x.shape
    x = np.asarray(x, np.float64).reshape(B * T, D)
    v = np.asarray(valid).reshape(-1)
    w_r = np.asarray(moe.gate.weight[...], np.float64)
    bias = np.asarray(moe.gate.e_score_correction_bias[...], np.float64)
    g, u, d = (np.asarray(p[...], np.float64) for p in (moe.experts.gate_proj, moe.experts.up_proj,
                                                         moe.experts.down_proj))
    Ex, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    s = 1 / (1 + np.exp(-(x @ w_r)))  # [N, E]
    c = s + bias
    gs = np.sort(c.reshape(-1, G, Ex // G), axis=-1)[..., -2:].sum(-1)  # [N, G]
    keep = np.zeros_like(gs, bool)
    np.put_along_axis(keep, np.argsort(-gs, axis=1, kind="stable")[:, :cfg.topk_group], True, axis=1)
    c = np.where(np.repeat(keep, Ex // G, axis=1), c, -np.inf)
    chosen = np.argsort(-c, axis=1, kind="stable")[:, :k]  # [N, k]
    wts = np.take_along_axis(s, chosen, 1)
    wts = wts / (wts.sum(1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros_like(x)
    for e in range(Ex):
        weight = np.where(chosen == e, wts, 0).sum(1) * v  # [N]
        out += weight[:, None] * ((silu(x @ g[e]) * (x @ u[e])) @ d[e])
    sg, su, sd = (np.asarray(p.weight[...], np.float64) for p in (moe.shared_experts.gate_proj,
                                                                  moe.shared_experts.up_proj,
                                                                  moe.shared_experts.down_proj))
    out += (silu(x @ sg) * (x @ su)) @ sd
    hits = (chosen[:, :, None] == np.arange(Ex)).sum(1) * v[:, None]  # [N, E]
    normed = s / s.sum(1, keepdims=True) * v[:, None]
    vb = np.asarray(valid).reshape(B, T).sum(1)
    return (out.reshape(B, T, D), hits.sum(0), hits.reshape(B, T, Ex).sum(1),
            normed.reshape(B, T, Ex).sum(1) / np.maximum(vb, 1)[:, None])


@pytest.mark.parametrize("path", ["dense", "loop"])
def test_unsharded_moe_matches_dense_loop_over_experts(path, monkeypatch):
    """Both CPU paths with few tokens: every expert on every token (moe._dense_ffn, up to
    DENSE_ROWS_PER_EXPERT rows per expert) and the routed tile loop: outputs and statistics equal the float64
    loop over experts, gradients equal those of the ragged_dot impl (which takes neither path)."""
    if path == "loop":
        monkeypatch.setattr(moe_module, "DENSE_ROWS_PER_EXPERT", 0)
    cfg = tiny_cfg()
    assert (60 * cfg.num_experts_per_tok <= moe_module.DENSE_ROWS_PER_EXPERT * E) == (path == "dense")
    moe = make_moe(cfg)
    x = jax.random.normal(jax.random.key(5), (3, 20, D))
    valid = (jnp.arange(20)[None, :] >= jnp.array([[0], [5], [20]]))  # left padding; the last row: none valid
    y, stats = jax.jit(lambda x, v: moe(x, v))(x, valid)
    want_y, load, seq_load, seq_score = dense_reference(cfg, moe, x, valid)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.load), load)
    np.testing.assert_array_equal(np.asarray(stats.seq_load), seq_load)
    np.testing.assert_allclose(np.asarray(stats.seq_score), seq_score, atol=1e-6)
    assert float(stats.load.sum()) == (20 + 15) * cfg.num_experts_per_tok
    np.testing.assert_allclose(np.asarray(stats.seq_score.sum(1)), [1, 1, 0], atol=1e-5)
    y_all, _ = moe(x)  # valid=None: every token routed, as before this interface
    np.testing.assert_allclose(np.asarray(y_all), dense_reference(cfg, moe, x, jnp.ones_like(valid))[0], atol=1e-5,
                               rtol=1e-5)

    def grads(moe):
        graphdef, state = nnx.split(moe)
        loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, valid)[0]))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)

    for g, w in zip(jax.tree.leaves(grads(moe)), jax.tree.leaves(grads(make_moe(cfg, gmm_impl="ragged_dot"))),
                    strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ expert parallelism


def _loss_and_grads(graphdef, params, rest, x, valid, ct):
    """(y, stats) and the gradients w.r.t. x and every nnx.Param of a loss linear in y plus seq_score**2."""

    def loss(params, x):
        y, stats = nnx.merge(graphdef, params, rest)(x, valid)
        return jnp.sum(y * ct) + jnp.sum(stats.seq_score ** 2), (y, stats)

    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, stats, grads


def test_cpu_moe_with_many_rows_per_expert():
    """At 64+ rows per expert the CPU path runs gate and up as one grouped matmul and batches 4 tiles per loop
    step (the training regime): the outputs equal the float64 loop over experts, and the gradients equal
    those of the ragged_dot impl (separate gate and up, no loop)."""
    from pallas_kernels.grouped_matmul import CPU_TILE, cpu_tile, cpu_visits_per_step

    cfg = tiny_cfg()
    B, T = 2, 128
    rows = B * T * cfg.num_experts_per_tok
    assert rows >= CPU_TILE * E and cpu_visits_per_step(rows, E, cpu_tile(rows, E)) == 4  # the regime tested
    x = jax.random.normal(jax.random.key(6), (B, T, D))
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [9]])
    tiled, dense = make_moe(cfg, gmm_impl="tiled"), make_moe(cfg, gmm_impl="ragged_dot")
    y, _ = jax.jit(lambda x, v: tiled(x, v))(x, valid)
    np.testing.assert_allclose(np.asarray(y), dense_reference(cfg, tiled, x, valid)[0], atol=1e-5, rtol=1e-5)

    def grads(moe):
        graphdef, state = nnx.split(moe)
        loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, valid)[0]))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)

    for g, w in zip(jax.tree.leaves(grads(tiled)), jax.tree.leaves(grads(dense)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape,B,T,capacity,impl", [
    ({"expert": 4, "data": 2}, 4, 16, 2.0, None),
    ({"expert": 2, "tensor": 2, "fsdp": 2}, 3, 15, 0.25, None),  # B, T padded; small slots: several rounds
    ({"expert": 8}, 8, 8, None, None),  # worst-case slots: one round
    ({"expert": 2, "tensor": 2, "context": 2}, 2, 8, 1.0, "megablox"),  # the TPU kernel, interpreted
])
def test_sharded_moe_equals_unsharded(shape, B, T, capacity, impl):
    cfg = tiny_cfg()
    moe = make_moe(cfg, capacity_factor=capacity, gmm_impl=impl)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(7), (B, T, D))
    valid = jax.random.uniform(jax.random.key(8), (B, T)) > 0.2
    ct = jax.random.normal(jax.random.key(9), (B, T, D))
    fn = jax.jit(functools.partial(_loss_and_grads, graphdef))
    want = fn(params, rest, x, valid, ct)
    with jax.set_mesh(make_mesh(shape)):
        got = fn(params, rest, x, valid, ct)
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want),
                                 strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    grads = got[2][0]
    assert np.abs(np.asarray(grads["experts"]["down_proj"][...])).max() > 0


COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-to-all|ragged-all-to-all|all-reduce|reduce-scatter|"
                        r"collective-permute)(-start)?\(")


def collective_sizes(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, element count of each array of its result) for every collective of a compiled HLO."""
    out = []
    for m in COLLECTIVE.finditer(hlo):
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
        out.append((m.group(2), [math.prod(int(d) for d in s.split(",") if d) for s in shapes]))
    return out


def test_sharded_moe_moves_only_local_tokens():
    """Forward and backward: every collective moves O(local tokens * top_k * D), far less than the global
    batch. An all-to-all's result is its whole exchange buffer (one array per peer), so its arrays are summed;
    an all-reduce may combine several independent arrays (gradients), so each is bounded alone."""
    cfg = tiny_cfg(num_experts_per_tok=1)
    graphdef, params, rest = nnx.split(make_moe(cfg, capacity_factor=1.0), nnx.Param, ...)
    B, T = 128, 32
    mesh = make_mesh({"expert": 4, "tensor": 2})
    abstract = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    with jax.set_mesh(mesh):
        hlo = jax.jit(functools.partial(_loss_and_grads, graphdef)).lower(
            params, rest, abstract((B, T, D)), abstract((B, T), bool), abstract((B, T, D))).compile().as_text()
    sizes = collective_sizes(hlo)
    ops = {op for op, _ in sizes}
    assert "all-to-all" in ops and "all-reduce" in ops, ops
    local_rows = B * T // 4 * cfg.num_experts_per_tok  # tokens split over "expert", replicated over "tensor"
    largest_param = max(v[...].size for _, v in nnx.to_flat_state(params))
    bound = max(local_rows * D, largest_param)  # capacity 1.0: one round's slots hold the device's own rows
    assert bound * 4 <= B * T * D  # the checks below tell local from global
    for op, arrays in sizes:
        assert (sum(arrays) if "all-to-all" in op else max(arrays)) <= bound, (op, arrays, bound)


# ---------------------------------------------------------------------------- router bias, checkpoints


def test_router_bias_is_checkpointed_but_not_a_param(tmp_path):
    model = glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=glmjax.ModelOptions())
    biases = dict(nnx.to_flat_state(nnx.state(model, RouterBias)))
    assert biases and all(p[-1] == "e_score_correction_bias" for p in biases)
    assert not any(p[-1] == "e_score_correction_bias" for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert any(np.abs(np.asarray(v[...])).max() > 0 for v in biases.values())  # loaded, not left at 0
    glmjax.save_pretrained(model, tmp_path)
    again = glmjax.load_pretrained(tmp_path, options=glmjax.ModelOptions())
    for path, v in nnx.to_flat_state(nnx.state(again, CHECKPOINT_VARS)):
        want = dict(nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS)))[path]
        assert type(v) is type(want)
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[...]))


def test_load_pretrained_dtype_and_options_must_agree():
    f32 = glmjax.ModelOptions(dtype=jnp.float32, param_dtype=jnp.float32)
    with pytest.raises(ValueError, match="conflicts"):
        glmjax.load_pretrained(GOLDEN / "indexshare_freq", dtype=jnp.bfloat16, options=f32)
    model = glmjax.load_pretrained(GOLDEN / "indexshare_freq", dtype=jnp.float32, options=f32)  # agreeing: fine
    assert model.options.param_dtype == jnp.float32
