"""The interfaces training and serving build on: the indexer's own gradient, attention over a KV cache,
packed sequences, the backbone's auxiliary outputs, the router bias as its own variable type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.model.attention import Keys, SequenceInfo
from glmjax.model.moe import RouterBias
from tests.conftest import three_layer_indexshare_config


def model_of(**opts):
    cfg = three_layer_indexshare_config()  # 3 layers (dense, MoE; full and shared indexers), MTP, n_group 4
    return glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(q_block=16, **opts), rngs=nnx.Rngs(1))


def ids_of(B, T, seed=0, vocab=128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32))


def grads_by_kind(grads):
    flat = {"/".join(map(str, p)): np.abs(np.asarray(v[...])).max() for p, v in nnx.to_flat_state(grads)}
    indexer = {p: g for p, g in flat.items() if "/indexer/" in p}
    other = {p: g for p, g in flat.items() if "/indexer/" not in p}
    return indexer, other


def test_indexer_learns_from_its_loss_and_not_from_the_lm_loss():
    model = model_of(indexer_loss=True)
    ids = ids_of(2, 32)

    def lm_loss(m):
        return jnp.mean(m(ids).logits ** 2)

    def indexer_loss(m):
        out = m.backbone(ids)
        aux = [out.aux] + ([out.mtp_aux] if out.mtp_aux is not None else [])
        return sum(jnp.sum(a.indexer_kl) for a in aux) / sum(jnp.sum(a.indexer_tokens) for a in aux)

    params = nnx.All(nnx.Param)
    lm_grads = nnx.jit(nnx.grad(lm_loss, argnums=nnx.DiffState(0, params)))(model)
    idx, other = grads_by_kind(lm_grads)
    assert idx and max(idx.values()) == 0.0
    assert max(other.values()) > 0

    kl, idx_grads = nnx.jit(nnx.value_and_grad(indexer_loss, argnums=nnx.DiffState(0, params)))(model)
    assert float(kl) > 0
    idx, other = grads_by_kind(idx_grads)
    names = {p.split("/indexer/")[1].split("/")[0] for p, g in idx.items() if g > 0}
    assert names == {"wq_b", "wk", "k_norm", "weights_proj"}, idx  # every indexer parameter trains
    assert max(other.values()) == 0.0  # and nothing else does


def test_moe_aux_counts_routed_tokens():
    model = model_of()
    ids = ids_of(2, 24)
    mask = jnp.ones((2, 24), jnp.int32).at[0, :4].set(0)
    out = nnx.jit(lambda m, i, a: m.backbone(i, a))(model, ids, mask)  # one compile, not op by op
    cfg = model.config
    n_moe = sum(1 for m in cfg.mlp_schedule if m == "sparse")
    load = np.asarray(out.aux.moe.load)
    assert load.shape == (n_moe, cfg.n_routed_experts)
    np.testing.assert_allclose(load.sum(-1), (48 - 4) * cfg.num_experts_per_tok)  # padding is not counted
    np.testing.assert_allclose(np.asarray(out.aux.moe.seq_load).sum(-1), [[20 * cfg.num_experts_per_tok,
                                                                           24 * cfg.num_experts_per_tok]] * n_moe)
    np.testing.assert_allclose(np.asarray(out.aux.moe.seq_score).sum(-1), 1.0, rtol=1e-5)


def test_router_bias_is_not_a_param():
    model = model_of()
    biases = nnx.to_flat_state(nnx.state(model, RouterBias))
    assert len(biases) > 0
    assert not any("e_score_correction_bias" in "/".join(map(str, p))
                   for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("impl", ["reference", "pallas_tpu"])
def test_attention_over_a_longer_cache_equals_the_full_forward(impl):
    """Queries = the last tokens of a sequence; keys = a cache of all its tokens plus unused slots."""
    model = model_of(attention_impl=impl, interpret=impl != "reference")
    cfg = model.config
    B, T, T2, S = 2, 24, 5, 40
    x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    info = model.sequence_info(positions, positions, jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool))
    stack = next(s for s in model.stacks if len(s.segment.kinds) > 1)  # groups of a full + shared layers
    graphdef, state = nnx.split(stack.groups)
    layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).layers  # its first group
    full_attn, shared_attn = layers[0].self_attn, layers[1].self_attn
    want_full, topk, _ = full_attn(x, info)
    want_shared, _, _ = shared_attn(x, info, topk)

    proj_all = full_attn.project(x, info)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, S - T)) + ((0, 0),) * (a.ndim - 2), constant_values=7.0)  # noqa: E731
    keys = Keys(pad(proj_all.latent), pad(proj_all.index_keys), jnp.arange(S)[None, :].repeat(B, 0) < T)
    q_info = SequenceInfo(*(a[:, T - T2:] for a in info))
    got_full, got_topk, _ = full_attn.attend(full_attn.project(x[:, T - T2:], q_info), q_info, None, keys)
    np.testing.assert_allclose(np.asarray(got_full), np.asarray(want_full[:, T - T2:]), atol=1e-5)
    assert np.array_equal(np.sort(np.asarray(got_topk), -1), np.sort(np.asarray(topk[:, T - T2:]), -1))

    shared_keys = Keys(pad(shared_attn.project(x, info).latent), None, keys.valid)
    got_shared, _, _ = shared_attn.attend(shared_attn.project(x[:, T - T2:], q_info), q_info, got_topk,
                                          shared_keys)
    np.testing.assert_allclose(np.asarray(got_shared), np.asarray(want_shared[:, T - T2:]), atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "pallas_tpu"])
def test_packed_documents_equal_separate_runs(impl):
    model = model_of(attention_impl=impl, interpret=impl != "reference")
    lengths = [11, 7, 14]
    docs = [ids_of(1, n, seed=i, vocab=160) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs + [jnp.zeros((1, 4), jnp.int32)], axis=1)  # + 4 padding tokens
    seg = jnp.asarray(np.repeat([1, 2, 3, 0], lengths + [4])[None].astype(np.int32))
    out = nnx.jit(lambda m, i, s: m(i, segment_ids=s))(model, packed, seg)
    start = 0
    for doc, n in zip(docs, lengths, strict=True):
        alone = nnx.jit(lambda m, i: m(i))(model, doc)
        np.testing.assert_allclose(np.asarray(out.logits[:, start:start + n]), np.asarray(alone.logits), atol=1e-5)
        # MTP row j uses token j+1: rows before the document's last token.
        np.testing.assert_allclose(np.asarray(out.mtp_logits[:, start:start + n - 1]),
                                   np.asarray(alone.mtp_logits), atol=1e-5)
        start += n


def test_mtp_steps_share_the_first_steps_topk_and_kv():
    """backbone(mtp_steps=3) against the drafter's way: step s >= 1 of the MTP layer attends over a KV cache
    holding the first step's latent rows, with the first step's top-k, at rope position j + s."""
    model = model_of()
    B, T, steps = 2, 20, 3
    ids = ids_of(B, T, seed=3)
    out = nnx.jit(lambda m, i: m.backbone(i, mtp_steps=steps))(model, ids)
    assert len(out.mtp_hidden) == steps and out.mtp_aux.indexer_kl.shape == (steps,)

    def drafter(model, ids, h):
        """The MTP steps one after another (jitted as one program rather than run op by op)."""
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        zeros = jnp.zeros((B, T), jnp.int32)
        mtp = model.mtp[0]

        def shifted(a, n, fill):
            return jnp.concatenate([a[:, n:], jnp.full((B, n), fill, a.dtype)], axis=1)

        first = None
        normed = []
        for s in range(steps):
            valid = shifted(jnp.ones((B, T), bool), 1 + s, False)
            info = model.sequence_info(pos + s, pos, zeros, valid)
            embeds = model.embed_tokens(shifted(ids, 1 + s, 0))
            if first is None:
                step = mtp(embeds, h, info)
                first = step
                cache = Keys(step.latent, None, jnp.ones((B, T), bool))
            else:
                step = mtp(embeds, h, info, topk=first.topk, keys=cache)
            normed.append(step.normed)
            h = step.out
        return normed

    drafted = nnx.jit(drafter)(model, ids, out.hidden)
    for s in range(steps):
        rows = T - 1 - s  # rows whose input token exists
        np.testing.assert_allclose(np.asarray(out.mtp_hidden[s][:, :rows]), np.asarray(drafted[s][:, :rows]),
                                   atol=2e-5)
    # Step 0 is what the model's own MTP logits are made of.
    logits = nnx.jit(lambda m, i: m(i))(model, ids).mtp_logits
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.head(out.mtp_hidden[0])[:, :-1]), atol=1e-5)
