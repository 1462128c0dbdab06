"""Model structure, scale on shapes alone, bounded memory at long context, MoE routing."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import glmjax
from glmjax.model.decoder import plan_segments
from glmjax.model.moe import MoE
from glmjax.weights.mapping import CHECKPOINT_VARS
from tests.conftest import REPO


def glm52():
    return glmjax.load_config(REPO / "configs" / "glm-5.2.json")


def test_glm52_segments():
    segs = plan_segments(glm52())
    summary = [(s.first_layer, s.num_groups, tuple((k.mlp, k.full_indexer) for k in s.kinds)) for s in segs]
    assert summary == [
        (0, 2, (("dense", True),)),
        (2, 1, (("dense", True),) + (("sparse", False),) * 3),
        (6, 18, (("sparse", True),) + (("sparse", False),) * 3),
    ]
    covered = [s.hf_layer(g, j) for s in segs for g in range(s.num_groups) for j in range(s.group_size)]
    assert covered == list(range(78))


def abstract_model(cfg, dtype=jnp.bfloat16):
    opts = glmjax.ModelOptions(dtype=dtype, param_dtype=dtype, q_block=256)
    return nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, opts, rngs=nnx.Rngs(0)))


def test_glm52_parameter_count_on_shapes():
    cfg = glm52()
    model = abstract_model(cfg)
    params = nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS))  # the router bias counts, as in transformers
    total = sum(int(np.prod(v.shape)) for _, v in params)
    indexers = [(p, v) for p, v in params if "indexer" in p and p[-2] == "wq_b"]
    n_indexer_layers = sum(int(np.prod(v.shape[:-3])) for _, v in indexers)  # stacked dims count layers
    print(f"GLM-5.2 on shapes: {total / 1e9:.2f}B parameters, {n_indexer_layers} indexer layers (incl. MTP)")
    assert total == cfg.num_parameters()
    assert round(total / 1e9, 1) == 753.3
    assert n_indexer_layers == 21 + 1  # 21 full main layers + the MTP layer's own indexer


def _compile_seconds(cfg, T=512):
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)

    def fwd(state, ids):
        out = nnx.merge(graphdef, state)(ids)
        return out.logits, out.mtp_logits

    t0 = time.perf_counter()
    lowered = jax.jit(fwd).lower(state, jax.ShapeDtypeStruct((1, T), jnp.int32))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    logits, mtp = jax.eval_shape(fwd, state, jax.ShapeDtypeStruct((1, T), jnp.int32))
    assert logits.shape == (1, T, cfg.vocab_size) and mtp.shape == (1, T - 1, cfg.vocab_size)
    return t1 - t0, t2 - t1, compiled


def test_glm52_forward_lowers_and_compile_time_is_flat_in_depth():
    full = glm52()
    small = full.replace(num_hidden_layers=4, index_topk_freq=None, index_skip_topk_offset=None)
    lo4, co4, _ = _compile_seconds(small)
    lo78, co78, _ = _compile_seconds(full)
    print(f"compile (CPU, abstract shapes, T=512): 4 layers lower {lo4:.2f}s + compile {co4:.2f}s; "
          f"78 layers lower {lo78:.2f}s + compile {co78:.2f}s")
    # Scanned groups: 19.5x the depth must not cost anywhere near 19.5x the compile time.
    assert lo78 + co78 < 5 * (lo4 + co4) + 5


def test_long_context_memory_is_bounded():
    """T = 4096 on the tiny config: the compiled forward's temporaries stay far below one [T, S] score array
    per indexer head, because DSA runs in query blocks."""
    cfg = glmjax.load_config(REPO / "configs" / "tiny-demo.json")
    T = 4096
    model = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(q_block=128), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits).lower(
        state, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense_scores = T * T * cfg.index_n_heads * 4  # one layer's [T, S] indexer logits in float32
    print(f"T={T}: temp {temp / 2**20:.1f} MiB vs one dense indexer score array {dense_scores / 2**20:.0f} MiB")
    assert temp < dense_scores / 8


def naive_moe(cfg, moe, x):
    """Per-token numpy reference of the router and experts."""
    x = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    w_r = np.asarray(moe.gate.weight[...], np.float64)
    bias = np.asarray(moe.gate.e_score_correction_bias[...], np.float64)
    g, u, d = (np.asarray(p[...], np.float64) for p in (moe.experts.gate_proj, moe.experts.up_proj,
                                                         moe.experts.down_proj))
    E, G = cfg.n_routed_experts, cfg.n_group
    out = np.zeros_like(x)
    for n, xn in enumerate(x):
        s = 1 / (1 + np.exp(-(xn @ w_r)))
        c = s + bias
        gs = np.sort(c.reshape(G, E // G), axis=1)[:, -2:].sum(1)
        keep_groups = np.argsort(-gs, kind="stable")[: cfg.topk_group]
        masked = np.full(E, -np.inf)
        for gi in keep_groups:
            masked[gi * (E // G):(gi + 1) * (E // G)] = c[gi * (E // G):(gi + 1) * (E // G)]
        chosen = np.argsort(-masked, kind="stable")[: cfg.num_experts_per_tok]
        wts = s[chosen] / (s[chosen].sum() + 1e-20) * cfg.routed_scaling_factor
        for e, wt in zip(chosen, wts, strict=True):
            h = xn @ g[e]
            out[n] += wt * (((h / (1 + np.exp(-h))) * (xn @ u[e])) @ d[e])
    sg, su, sd = (np.asarray(p.weight[...], np.float64) for p in (moe.shared_experts.gate_proj,
                                                                  moe.shared_experts.up_proj,
                                                                  moe.shared_experts.down_proj))
    h = x @ sg
    return out + ((h / (1 + np.exp(-h))) * (x @ su)) @ sd


def test_moe_matches_per_token_reference():
    cfg = glmjax.load_config(REPO / "configs" / "tiny-demo.json").replace(
        n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, initializer_range=0.2)
    moe = MoE(cfg, glmjax.ModelOptions(), rngs=nnx.Rngs(3))
    moe.gate.e_score_correction_bias[...] = 0.3 * jax.random.normal(jax.random.key(4), (16,))
    x = jax.random.normal(jax.random.key(5), (2, 24, cfg.hidden_size))
    np.testing.assert_allclose(np.asarray(moe(x)[0]).reshape(-1, cfg.hidden_size), naive_moe(cfg, moe, x),
                               atol=2e-5, rtol=1e-4)
