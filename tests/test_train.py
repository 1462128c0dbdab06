"""train.py end to end on a tiny model: it learns, resumes bit for bit, balances experts, names bad fields."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.errors import ConfigError
from glmjax.model.moe import route
from glmjax.train import balance
from glmjax.train.config import load_train_config
from glmjax.train.data import write_arrayrecord
from glmjax.train.objective import shifted_labels
from tests.conftest import REPO


def corpus(path, n_docs=64, used=48, seed=0):
    """Documents a model can learn quickly: arithmetic progressions (random start and step) over the first
    `used` token ids of the 512 (so even the unigram distribution is far from uniform)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, step, n = rng.integers(0, used), rng.integers(1, 4), rng.integers(20, 60)
        docs.append((2 + (start + step * np.arange(n)) % used).astype(np.int32))
    write_arrayrecord(path, docs)
    return path


def tiny_config(tmp_path, **sets):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = corpus(tmp_path / "train.arrayrecord")
    val = corpus(tmp_path / "val.arrayrecord", n_docs=16, seed=1)
    base = {
        "model": {"config": str(REPO / "configs" / "tiny-demo.json"), "dtype": "float32", "param_dtype": "float32",
                  "q_block": 16},
        "data": {"train_files": [str(train)], "validation_files": [str(val)], "seq_len": 32,
                 "global_batch_size": 4, "eos_id": 1, "prefetch": 0, "read_threads": 0},
        "optimizer": {"peak_lr": 1e-2, "warmup_steps": 2, "total_steps": 40},
        "loss": {"mtp_steps": 2, "loss_chunk": 16},
        "run": {"steps": 6, "output_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 0,
                "export_hf": False},
        "checkpoint": {"save_every": 3, "async_save": False},
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in sets.items()]
    return load_train_config(None, overrides, base=base)


def train(cfg):
    from glmjax.train.trainer import Trainer

    trainer = Trainer(cfg, log=lambda *a: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [json.loads(line) for line in open(f"{cfg.run.output_dir}/metrics.jsonl")]


def test_bad_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.peak_lrr"):
        tiny_config(tmp_path, **{"optimizer.peak_lrr": 1.0})
    with pytest.raises(ConfigError, match=r"run\.steps"):
        tiny_config(tmp_path, **{"run.steps": "many"})
    with pytest.raises(ConfigError, match=r"mesh\.experts"):
        tiny_config(tmp_path, **{"mesh.experts": 2})
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        tiny_config(tmp_path, **{"data.seq_len": 1})
    with pytest.raises(ConfigError, match="no preset"):
        load_train_config("no-such-preset")


def test_presets_load():
    for name in ("demo", "glm-5.2-midtrain-128k", "glm-5.2-dense-warmup-128k"):
        cfg = load_train_config(name)
        assert cfg.run.steps > 0
    assert load_train_config("glm-5.2-dense-warmup-128k").data.seq_len == 131072  # the warm-up at full length


def test_shifted_labels_stay_inside_documents():
    ids = jnp.arange(10, dtype=jnp.int32)[None]
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]], jnp.int32)
    labels, w = shifted_labels(ids, seg, 2)
    assert w.tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 0, 0]]
    assert labels[0, :2].tolist() == [2, 3] and labels[0, 4] == 6


def test_training_learns_and_resumes_bit_for_bit(tmp_path):
    # With the MTP acceptance (TV) loss on: it trains and resumes like every other term.
    tv = {"loss.mtp_tv_weight": 0.5}
    straight = train(tiny_config(tmp_path / "a", **tv))
    losses = [r["train/loss"] for r in straight]
    lm = [r["train/lm_loss"] for r in straight]
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    assert lm[-1] < lm[0] - 1.0, lm
    assert all(np.isfinite(r["train/mtp_loss/2"]) for r in straight)
    assert all(0.0 <= r["train/mtp_expected_accepted"] <= 2.0 for r in straight)

    # An interruption after step 3: a run directory holding only the step-3 checkpoint (model, optimizer,
    # data iterator), resumed to step 6.
    (tmp_path / "b" / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "run" / "checkpoints" / "3", tmp_path / "b" / "run" / "checkpoints" / "3")
    resumed = train(tiny_config(tmp_path / "b", **tv))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["train/loss"] for r in resumed] == losses[3:]  # bit for bit


def test_bias_update_moves_expert_loads_toward_balance():
    cfg = glmjax.load_config(REPO / "configs" / "tiny-demo.json")
    x = jax.random.normal(jax.random.key(0), (4096, cfg.hidden_size))
    w = jax.random.normal(jax.random.key(1), (cfg.hidden_size, cfg.n_routed_experts)) * 0.05
    w = w.at[:, :2].add(0.2)  # experts 0 and 1 are preferred by most tokens
    bias = jnp.zeros((cfg.n_routed_experts,))

    def load(bias):
        experts = route(cfg, x, w, bias).experts
        return jnp.bincount(experts.reshape(-1), length=cfg.n_routed_experts)

    before = float(balance.load_imbalance(load(bias)[None])[0])
    for _ in range(200):
        bias = bias + balance.bias_step(load(bias), 2e-3)
    after = float(balance.load_imbalance(load(bias)[None])[0])
    assert before > 1.5 and after < 1.1, (before, after)


@pytest.mark.slow
def test_compile_only_holds_the_whole_step_for_a_tpu_mesh():
    """train.py --compile-only on the tiny model for v5p 2x2x1 under context x tensor: the compiled step
    (objective, gradients, AdamW, bias update) holds the Mosaic kernels and reports per-chip memory."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed")
    from glmjax.train.compile_only import compile_train_step

    base = {"model": {"config": str(REPO / "configs" / "tiny-demo.json"), "attention_impl": "pallas_tpu",
                      "moe_gmm_impl": "megablox", "q_block": 16},
            "mesh": {"context": 2, "tensor": 2},
            "data": {"train_files": ["unused.arrayrecord"], "seq_len": 128, "global_batch_size": 2},
            "run": {"steps": 1}}
    report = compile_train_step(load_train_config(None, base=base), "v5p:2x2x1")
    assert report.mosaic_kernels > 0 and report.chips == 4
    assert 0 < report.param_bytes < report.total_bytes and report.optimizer_bytes == 2 * report.param_bytes


def test_the_committed_demo_model_loads_and_knows_python():
    """models/demo (train.py's demo export): loads with its tokenizer and predicts stdlib-like code far
    better than a unigram model would."""
    from tokenizers import Tokenizer

    from glmjax.train.tokenizer import stdlib_sources

    path = REPO / "models" / "demo"
    model = glmjax.load_pretrained(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    source = next(p for p in stdlib_sources() if p.name == "bisect.py").read_text()
    text = source[source.index("def "):][:2000]  # code, past the license docstring
    ids = jnp.asarray([tok.encode(text).ids[:256]], jnp.int32)
    out = nnx.jit(lambda m, i: m(i))(model, ids)  # one compile: half the time of running op by op
    logp = jax.nn.log_softmax(out.logits[0, :-1], axis=-1)
    nll = -float(jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)))
    assert nll < 5.0, nll  # untrained: ln(2048) = 7.6; unigram entropy of stdlib tokens: about 5.6


def test_dense_attention_selects_every_key():
    """ModelOptions.dense_attention (the warm-up's forward) is the model with index_topk >= T."""
    from tests.conftest import three_layer_indexshare_config

    cfg = three_layer_indexshare_config()
    T = 2 * cfg.index_topk
    dense = glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(q_block=16, dense_attention=True), rngs=nnx.Rngs(0))
    wide = glmjax.GlmMoeDsa(cfg.replace(index_topk=T), glmjax.ModelOptions(q_block=16), rngs=nnx.Rngs(0))
    sparse = glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(q_block=16), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, T), 2, cfg.vocab_size)
    logits = nnx.jit(lambda m, i: m(i).logits)  # one compile each: faster than running op by op
    got = logits(dense, ids)
    np.testing.assert_allclose(got, logits(wide, ids), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits(sparse, ids), atol=1e-3)  # T > index_topk: it matters


def test_dense_warmup_trains_the_indexers_and_nothing_else(tmp_path):
    from glmjax.train.trainer import Trainer
    from tests.conftest import three_layer_indexshare_config

    # Larger initial weights than the usual 0.02: peaked attention, so the indexer has a distribution to learn.
    tmp_path.mkdir(parents=True, exist_ok=True)
    three_layer_indexshare_config().replace(initializer_range=0.3).to_json(tmp_path / "model.json")
    cfg = tiny_config(tmp_path, **{"run.stage": "dense_warmup", "run.steps": 6, "optimizer.peak_lr": 1e-2,
                                   "checkpoint.save_every": 100, "model.config": str(tmp_path / "model.json")})

    def values(model):
        leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param, nnx.Variable))[0]
        return {jax.tree_util.keystr(k): np.array(v) for k, v in leaves}

    trainer = Trainer(cfg, log=lambda *a: None)
    try:
        before = values(trainer.model)
        trainer.fit()
        after = values(trainer.model)
    finally:
        trainer.close()
    records = [json.loads(line) for line in open(f"{cfg.run.output_dir}/metrics.jsonl")]
    kl = [r["train/indexer_kl"] for r in records]
    assert kl[-1] < 0.8 * kl[0], kl
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    indexer = {k for k in before if "'indexer'" in k and "rngs" not in k}
    assert changed == indexer, sorted(changed ^ indexer)  # the router biases included: no bias update


def test_chunked_acceptance_is_sum_of_min_with_a_detached_target():
    from glmjax.train.losses import chunked_acceptance

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (8, 11))
    head = lambda h: h @ w  # noqa: E731
    hq, hp = jax.random.normal(k2, (2, 12, 8)), jax.random.normal(k3, (2, 12, 8))
    want = jnp.sum(jnp.minimum(jax.nn.softmax(head(hq)), jax.nn.softmax(head(hp))), axis=-1)
    np.testing.assert_allclose(chunked_acceptance(head, hq, hp, chunk=4), want, rtol=1e-6)
    dq, dp = jax.grad(lambda a, b: jnp.sum(chunked_acceptance(head, a, b, chunk=4)), argnums=(0, 1))(hq, hp)
    assert np.abs(np.asarray(dq)).max() > 0 and not np.asarray(dp).any()


def test_expected_accepted_equals_multi_step_rejection_sampling():
    """The TV loss's E[accepted] = sum_s prod_{i<=s} sum_x min(p_i, q_i) against the serving engine's own
    rejection sampler: drafts drawn from q_s, accepted per row; 40K vmapped trials."""
    from glmjax.serve.sampling import rejection_accept, sampling_arrays
    from glmjax.train.losses import expected_accepted

    S, V, N = 3, 6, 40_000
    kp, kq, kd = jax.random.split(jax.random.key(1), 3)
    p = jax.nn.softmax(2.0 * jax.random.normal(kp, (S + 1, V)))  # the last row: the bonus token's target
    q = jax.nn.softmax(2.0 * jax.random.normal(kq, (S, V)))
    drafts = jax.random.categorical(kd, jnp.log(q), shape=(N, S)).astype(jnp.int32)
    s = sampling_arrays([1.0] * N, [0] * N, [1.0] * N, range(N))
    positions = jnp.broadcast_to(jnp.arange(S + 1, dtype=jnp.int32), (N, S + 1))
    accepted, _ = rejection_accept(drafts, jnp.broadcast_to(q, (N, S, V)), jnp.broadcast_to(p, (N, S + 1, V)), s,
                                   positions)
    alphas = [jnp.sum(jnp.minimum(p[i], q[i]))[None, None] for i in range(S)]
    total, rows = expected_accepted(alphas, [jnp.ones((1, 1))] * S)
    want = float(total / rows)
    got, sigma = float(jnp.mean(accepted)), float(jnp.std(accepted)) / N**0.5
    assert abs(got - want) < 4 * sigma, (got, want, sigma)
