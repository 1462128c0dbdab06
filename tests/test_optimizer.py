"""The training optimizer: config validation, schedules, decay mask, stage trainable sets, clipping,
gradient accumulation, Muon's per-slice orthogonalisation, bf16 moments, and the sharded state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.errors import ConfigError
from glmjax.model.layers import Linear, RMSNorm
from glmjax.model.moe import RouterBias
from glmjax.sharding import make_mesh, param_sharding, param_shardings
from glmjax.train.optimizer import (
    ClipState,
    OptimizerConfig,
    accumulate_gradients,
    build_optimizer,
    clip_by_global_norm_recorded,
    create_optimizer,
    last_grad_norm,
    make_schedule,
    optimizer_state_bytes,
    param_plan,
    path_names,
    step_metrics,
    trainable_filter,
)
from tests.conftest import REPO


def abstract_tiny():
    cfg = glmjax.load_config(REPO / "configs" / "tiny-demo.json")
    return nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny():
    """The abstract tiny model and random numpy weights for it (eager init costs ~20 s on 2 busy cores)."""
    model = abstract_tiny()
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), nnx.state(model))


def model_of(tiny, mesh=None):
    """A concrete tiny model, placed on `mesh` by the logical rules (like sharding.shard_model)."""
    model, weights = tiny
    shardings = None if mesh is None else param_shardings(model, mesh)
    return nnx.merge(nnx.graphdef(model), jax.device_put(weights, shardings))


def leaves(state):
    """{path string: Variable} of a State."""
    return {"/".join(path_names(p)): v for p, v in
            jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))}


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, field", [
    (dict(b2=1.5), "b2"), (dict(name="sgd"), "name"), (dict(warmup_steps=10, total_steps=5), "warmup_steps"),
    (dict(moment_dtype="float16"), "moment_dtype"), (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(schedule="wsd", decay_fraction=0.5, warmup_steps=60, total_steps=100), "decay_fraction"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
])
def test_bad_config_field_is_named(kwargs, field):
    with pytest.raises(ConfigError, match=rf"OptimizerConfig\.{field}:"):
        OptimizerConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    assert OptimizerConfig.from_dict({"name": "muon", "peak_lr": 1e-3}).name == "muon"
    with pytest.raises(ConfigError, match=r"OptimizerConfig\.peak_lrr: unknown field"):
        OptimizerConfig.from_dict({"peak_lrr": 1e-3})
    with pytest.raises(ConfigError, match="stage"):
        trainable_filter("warmup")


# --------------------------------------------------------------------------------------------- schedules


def test_cosine_schedule():
    s = make_schedule(OptimizerConfig(peak_lr=1.0, min_lr_ratio=0.1, warmup_steps=10, total_steps=110))
    got = {k: float(s(k)) for k in (0, 4, 9, 10, 60, 110, 500)}
    want = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1}
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
    assert float(s(35)) > 0.55 > float(s(85))  # cosine: above the line in the first half


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_schedule(shape):
    s = make_schedule(OptimizerConfig(peak_lr=2.0, min_lr_ratio=0.0, warmup_steps=10, total_steps=100,
                                      schedule="wsd", decay_fraction=0.2, decay_shape=shape))
    got = {k: float(s(k)) for k in (0, 9, 10, 50, 80, 90, 100, 200)}
    want = {0: 0.2, 9: 2.0, 10: 2.0, 50: 2.0, 80: 2.0, 90: 1.0, 100: 0.0, 200: 0.0}
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, atol=1e-6)
    assert (float(s(85)) > 1.5) == (shape == "cosine")  # linear: 1.5 at a quarter of the decay


# ------------------------------------------------------------------------------------- decay mask, stages

NOT_DECAYED = {  # per-layer vectors: every norm weight and bias
    "norm/weight", "mtp/0/enorm/weight", "mtp/0/hnorm/weight", "mtp/0/shared_head/norm/weight",
    *(f"{p}/{n}/weight" for p in ("mtp/0/decoder", "stacks/0/groups/layers/0", "stacks/1/groups/layers/0",
                                   "stacks/1/groups/layers/1", "stacks/2/groups/layers/0")
      for n in ("input_layernorm", "post_attention_layernorm", "self_attn/q_a_layernorm",
                "self_attn/kv_a_layernorm")),
    *(f"{p}/self_attn/indexer/k_norm/{w}" for p in ("mtp/0/decoder", "stacks/0/groups/layers/0",
                                                    "stacks/1/groups/layers/0", "stacks/2/groups/layers/0")
      for w in ("weight", "bias")),
}


def test_decay_mask_on_the_tiny_model():
    plan = param_plan(abstract_tiny(), OptimizerConfig(), "full")
    assert {r.path for r in plan if not r.rule.decay} == NOT_DECAYED
    decayed = {r.path for r in plan if r.rule.decay}
    assert {"embed_tokens/weight", "lm_head/weight", "mtp/0/eh_proj/weight",
            "stacks/1/groups/layers/0/mlp/experts/gate_proj", "stacks/1/groups/layers/0/mlp/gate/weight",
            "stacks/0/groups/layers/0/self_attn/indexer/wq_b/weight"} <= decayed
    assert not any("e_score_correction_bias" in r.path for r in plan)  # RouterBias is no Param
    assert all(r.trainable for r in plan)


batch_names = {"experts", "heads", "index_heads"}


def test_rules_match_the_logical_axes():
    """The path/shape rules agree with the model's own axis names: one leading "layers" dim under stacks,
    and Muon's (in, out) dims never include a heads or experts dim."""
    model = abstract_tiny()
    plan = {r.path: r for r in param_plan(model, OptimizerConfig(name="muon"), "full")}
    for path, v in nnx.iter_graph(model):
        if not isinstance(v, nnx.Param):
            continue
        rule = plan["/".join(map(str, path))].rule
        axes = ("layers",) * rule.layer_dims + tuple(v.get_metadata()["logical_axes"])
        assert len(axes) == len(v.shape), path
        if rule.optimizer == "muon":
            d = rule.muon_dims
            matrix = {axes[d.reduction_axis], axes[d.output_axis]}
            batch = {a for i, a in enumerate(axes) if i not in (d.reduction_axis, d.output_axis)}
            assert batch <= {"layers", "experts", "heads", "index_heads"}, (path, axes)
            # A 2-D map may output experts (router) or index heads (weights_proj); a 3-D one keeps them apart.
            assert "layers" not in matrix and (len(axes) - rule.layer_dims == 2 or not matrix & batch_names), \
                (path, axes)
        else:
            assert len(v.shape) - rule.layer_dims == 1 or path[0] in ("embed_tokens", "lm_head"), path


def test_dense_warmup_trains_only_the_indexers(tiny):
    model = model_of(tiny)
    cfg = OptimizerConfig(warmup_steps=0, total_steps=10)
    opt = create_optimizer(model, cfg, "dense_warmup")
    moments = leaves(nnx.state(opt, nnx.filterlib.All(nnx.Variable, lambda path, v: v.ndim > 0)))
    assert moments and all("/indexer/" in p for p in moments)
    n_indexer = len([p for p in leaves(nnx.state(model, nnx.Param)) if "/indexer/" in p])
    assert len(moments) == 2 * n_indexer  # mu and nu of each indexer param, of nothing else

    before = leaves(nnx.clone(nnx.state(model)))
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, trainable_filter("dense_warmup")))
    nnx.jit(lambda o, m, g: o.update(m, g))(opt, model, grads)
    after = leaves(nnx.state(model))
    changed = {p for p in before if not np.array_equal(before[p][...], after[p][...])}
    assert changed == {p for p in before if "/indexer/" in p and isinstance(before[p], nnx.Param)}
    assert not any(isinstance(before[p], RouterBias) for p in changed)


# ------------------------------------------------------------------------------------------ clipping


def test_clipping_records_the_pre_clip_norm():
    grads = {"a": jnp.full((3, 4), 2.0), "b": jnp.full((9,), 4.0)}  # norm sqrt(12*4 + 9*16) = sqrt(192)
    clip = clip_by_global_norm_recorded(1.0)
    out, state = clip.update(grads, clip.init(grads))
    assert isinstance(state, ClipState)
    np.testing.assert_allclose(float(state.grad_norm), np.sqrt(192.0), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(out)))), 1.0, rtol=1e-6)
    small = jax.tree.map(lambda g: g * 1e-3, grads)
    np.testing.assert_allclose(clip.update(small, state)[0]["a"], small["a"])  # under the limit: untouched


def test_clip_norm_is_a_train_metric():
    model = Toy(nnx.Rngs(0))
    cfg = OptimizerConfig(clip_norm=0.5, warmup_steps=4, total_steps=10, peak_lr=1.0)
    opt = create_optimizer(model, cfg, "full")
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0), nnx.state(model, nnx.Param))
    opt.update(model, grads)
    n = sum(g.size for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(float(last_grad_norm(opt)), 3.0 * np.sqrt(n), rtol=1e-5)
    metrics = step_metrics(opt, cfg)
    np.testing.assert_allclose(float(metrics["lr"]), 0.25)  # the first update's learning rate


# ----------------------------------------------------------------------------------------- accumulation


class Toy(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32):
        kw = dict(std=0.5, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.l1 = Linear((8,), (16,), ("embed", "mlp"), **kw)
        self.norm = RMSNorm(16, 1e-6, param_dtype=param_dtype)
        self.l2 = Linear((16,), (4,), ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.l2(self.norm(jnp.tanh(self.l1(x))))


def toy_loss(model, batch):
    """Summed weighted squared error and the weight: a token-sum loss like chunked_cross_entropy's."""
    err = jnp.sum(jnp.square(model(batch["x"]) - batch["y"]), axis=-1)
    return jnp.sum(err * batch["w"]), (jnp.sum(batch["w"]), {"err": err})


def test_accumulation_equals_the_big_batch():
    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
             "w": jnp.asarray(rng.integers(0, 2, 16), jnp.float32).at[:4].set(1.0)}  # unequal micro weights
    cfg = OptimizerConfig(warmup_steps=0, total_steps=10, peak_lr=1e-2, clip_norm=0.1)
    out = {}
    for steps in (1, 4):
        model = Toy(nnx.Rngs(0))
        opt = create_optimizer(model, cfg, "full")

        @nnx.jit
        def train_step(opt, model, batch, steps=steps):
            acc = accumulate_gradients(toy_loss, model, batch, steps=steps, wrt=opt.wrt)
            opt.update(model, acc.grads)
            return acc

        acc = train_step(opt, model, batch)
        assert acc.aux["err"].shape == (steps, 16 // steps)
        out[steps] = acc, leaves(nnx.state(model, nnx.Param))
    (acc1, p1), (acc4, p4) = out[1], out[4]
    np.testing.assert_allclose(acc4.loss, acc1.loss, rtol=1e-5)
    np.testing.assert_allclose(acc4.weight, acc1.weight)
    for a, b in zip(jax.tree.leaves(acc4.grads), jax.tree.leaves(acc1.grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for k in p1:
        np.testing.assert_allclose(p4[k][...], p1[k][...], rtol=1e-5, atol=1e-7)

    # The reference: the gradient of the whole batch's weighted mean loss.
    model = Toy(nnx.Rngs(0))
    want = nnx.grad(lambda m: toy_loss(m, batch)[0] / jnp.sum(batch["w"]))(model)
    for a, b in zip(jax.tree.leaves(acc4.grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_low_precision_masters_warn():
    with pytest.warns(UserWarning, match="float32 masters"):
        create_optimizer(Toy(nnx.Rngs(0), jnp.bfloat16), OptimizerConfig(), "full")


# ------------------------------------------------------------------------------------------------- Muon


def stacked_tree(fn):
    """A params tree shaped like the model's (paths decide the rules): a stacked expert weight, per-head
    projections, a norm and the embedding."""
    layer = {"mlp": {"experts": {"gate_proj": fn((2, 4, 16, 8))}},
             "self_attn": {"q_b_proj": {"weight": fn((2, 12, 3, 8))}, "o_proj": {"weight": fn((2, 3, 8, 16))}},
             "input_layernorm": {"weight": fn((2, 16))}}
    return {"embed_tokens": {"weight": fn((32, 16))}, "stacks": {0: {"groups": {"layers": {0: layer}}}}}


def test_muon_orthogonalises_each_slice():
    rng = np.random.default_rng(2)

    def grad(shape):  # slices differ in scale by up to 1000x along every leading dim
        scale = 10.0 ** rng.integers(0, 4, shape[:-2] + (1, 1))
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    grads = stacked_tree(grad)
    params = stacked_tree(jnp.zeros)
    cfg = OptimizerConfig(name="muon", warmup_steps=0, total_steps=10, peak_lr=1.0, clip_norm=None,
                          muon_consistent_rms=None)
    tx, _ = build_optimizer(cfg, "full")
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    layer = updates["stacks"][0]["groups"]["layers"][0]
    slices = {
        "experts": [layer["mlp"]["experts"]["gate_proj"][l, e] for l in range(2) for e in range(4)],
        "q_b_proj": [layer["self_attn"]["q_b_proj"]["weight"][l, :, h, :] for l in range(2) for h in range(3)],
        # muon_consistent_rms=None scales by sqrt(max(1, fan_out / fan_in)): sqrt(2) for o_proj's [8, 16].
        "o_proj": [layer["self_attn"]["o_proj"]["weight"][l, h] / np.sqrt(2) for l in range(2) for h in range(3)],
    }
    for name, mats in slices.items():
        svs = np.stack([np.linalg.svd(np.asarray(m), compute_uv=False) for m in mats])  # [slices, k]
        # Five Newton-Schulz steps bring each slice's singular values near 1 (the smallest of an
        # ill-conditioned slice lag behind), whatever its gradient scale: orthogonalising the flattened
        # tensor instead would leave the 1000x smaller slices with singular values near 1e-3.
        assert np.all((svs.max(1) > 0.7) & (svs.max(1) < 1.3)), (name, svs.max(1))
        assert np.all((np.median(svs, 1) > 0.6) & (np.median(svs, 1) < 1.2)), (name, np.median(svs, 1))
    # Vectors and the embedding take AdamW: the first Adam step is -lr * sign(g).
    np.testing.assert_allclose(jnp.abs(layer["input_layernorm"]["weight"]), 1.0, rtol=1e-4)
    np.testing.assert_allclose(jnp.abs(updates["embed_tokens"]["weight"]), 1.0, rtol=1e-4)


# -------------------------------------------------------------------------------------------- bf16 moments


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_bfloat16_moments(name):
    rng = np.random.default_rng(3)
    grads = stacked_tree(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32))
    params = stacked_tree(lambda s: jnp.full(s, 0.1, jnp.float32))
    results = {}
    for dtype in ("float32", "bfloat16"):
        tx, _ = build_optimizer(OptimizerConfig(name=name, moment_dtype=dtype, warmup_steps=0, total_steps=10),
                                "full")
        state = tx.init(params)
        for _ in range(3):
            updates, state = jax.jit(tx.update)(grads, state, params)
        results[dtype] = updates, state
    moments = [x for x in jax.tree.leaves(results["bfloat16"][1]) if x.ndim >= 2]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(results["bfloat16"][0]))
    nbytes = {k: sum(x.nbytes for x in jax.tree.leaves(v[1])) for k, v in results.items()}
    assert nbytes["bfloat16"] < 0.55 * nbytes["float32"]
    for a, b in zip(jax.tree.leaves(results["bfloat16"][0]), jax.tree.leaves(results["float32"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * float(jnp.max(jnp.abs(b))))


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_is_sharded_like_the_params(tiny, name):
    assert len(jax.devices()) == 8
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model = model_of(tiny, mesh)
    opt = create_optimizer(model, OptimizerConfig(name=name), "full", mesh=mesh)
    params = leaves(nnx.state(model, nnx.Param))
    state = leaves(nnx.state(opt))
    n_moments = 0
    for path, v in state.items():
        if v.ndim == 0 or path.endswith("ns_coeffs"):
            assert v[...].sharding.is_fully_replicated, path
            continue
        n_moments += 1
        param = next(params[p] for p in params if path.endswith("/" + p))
        assert v.shape == param.shape and v.get_metadata()["logical_axes"] == param.get_metadata()["logical_axes"]
        assert v[...].sharding == param[...].sharding == param_sharding(param, mesh), path
    # AdamW: mu and nu of every param; Muon: one momentum for matrices, two for the rest.
    assert n_moments == (2 * len(params) if name == "adamw" else
                         sum(1 + (r.rule.optimizer == "adamw") for r in param_plan(model, OptimizerConfig(name=name),
                                                                                    "full")))
    expert = next(v for p, v in state.items() if p.endswith("stacks/1/groups/layers/0/mlp/experts/gate_proj"))
    assert "expert" in str(expert[...].sharding.spec) and "tensor" in str(expert[...].sharding.spec)
    assert optimizer_state_bytes(opt) > 0
