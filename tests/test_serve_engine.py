"""The serving engine against the no-cache reference decoder: KV-cache decoding and MTP speculative decoding
(1, 3 and 7 draft steps) give the reference's greedy tokens, with chunked prefill, prompts of different
lengths, a stop token in the middle, more requests than slots, with a paged cache (requests waiting for
pages), and on meshes of 8 CPU devices with the cache split over the sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.errors import InputError
from glmjax.serve import greedy_decode_reference
from glmjax.serve.engine import Engine, EngineConfig
from glmjax.serve.paging import PageAllocator
from glmjax.serve.requests import Request, SamplingParams
from glmjax.sharding import make_mesh, shard_model
from tests.conftest import GOLDEN

NEW = 14
LENGTHS = (5, 23, 40, 9)  # index_topk is 16: the longer prompts decode sparsely
STOP_ROW = 2  # this prompt gets a stop token that its reference output hits in the middle


def load(**opts):
    return glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=glmjax.ModelOptions(q_block=16, **opts))


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(2, model.config.vocab_size, n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Greedy tokens per prompt, and a stop id for STOP_ROW: a token its output first shows at index >= 5 (the
    reference decoder stops a row after its first stop token: tests/test_reference_decode.py)."""
    want = greedy_decode_reference(model, prompts, NEW)
    row = want[STOP_ROW]
    i, stop = next((i, t) for i, t in enumerate(row) if i >= 5 and t not in row[:i])
    want[STOP_ROW] = row[:i + 1]
    return want, stop


def requests(prompts, stop, **params):
    return [Request(str(i), tuple(p), SamplingParams(max_tokens=NEW, temperature=0.0,
                                                     stop_token_ids=(stop,) if i == STOP_ROW else (), **params),
                    "completion") for i, p in enumerate(prompts)]


ENGINE = dict(slots=2, max_len=64, prefill_chunk=16)  # 4 requests in 2 slots; prompts of up to 3 chunks


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_cache_and_speculative_greedy_equal_the_reference(model, prompts, reference, k):
    want, stop = reference
    engine = Engine(model, EngineConfig(num_speculative_tokens=k, **ENGINE))
    out = engine.generate(requests(prompts, stop))
    assert [c.tokens for c in out] == want
    assert [c.finish_reason for c in out] == ["stop" if i == STOP_ROW else "length" for i in range(len(want))]
    if k:
        assert all(0 <= a <= k for c in out for a in c.accepted)
        # A verification emits 1 + accepted tokens: the steps account for every token after the first.
        assert all(sum(c.accepted) + c.steps >= len(c.tokens) - 1 for c in out)


# Sequence-sharded caches: every slot's keys split over context (and expert, for one long request: its slots
# are then not split), heads over tensor, slots over expert. (An FP8 cache split over context 4:
# test_tpu_fp8_layout_gives_the_reference_fp8_tokens.)
SHARDED = {"context2": ({"context": 2, "tensor": 2, "expert": 2}, ("context",), 3),
           "context8": ({"context": 8}, ("context",), 3),
           "context8-plain": ({"context": 8}, ("context",), 0),
           "context2xexpert2": ({"context": 2, "expert": 2, "tensor": 2}, ("context", "expert"), 3)}


# context2 (its slots over expert) is in `-m slow` for suite time: context2xexpert2 runs the same mesh.
@pytest.mark.parametrize("shape,kv_axes,k", [pytest.param(*v, marks=pytest.mark.slow) if n == "context2" else v
                                             for n, v in SHARDED.items()], ids=SHARDED.keys())
def test_sequence_sharded_cache_gives_the_unsharded_tokens(model, prompts, reference, shape, kv_axes, k):
    """On 8 devices with the cache split over the sequence (8 to 32 positions per shard against index_topk 16:
    one shard may hold a query's whole top-k), speculative greedy decoding (its verification is the target's
    greedy decoding of k + 1 tokens) and plain decoding give the unsharded engine's tokens (the reference's).
    The cache is split as asked."""
    want, stop = reference
    config = EngineConfig(num_speculative_tokens=k, kv_seq_axes=kv_axes, **ENGINE)
    mesh = make_mesh(shape)
    engine = Engine(shard_model(load(), mesh), config, mesh=mesh)
    assert [c.tokens for c in engine.generate(requests(prompts, stop))] == want
    shards = int(np.prod([shape[a] for a in kv_axes]))
    local = ENGINE["max_len"] // shards  # sequence axes: latent [G, L, B, S, ...] 3, index keys [G, B, S, ...] 2
    assert all(a.addressable_shards[0].data.shape[3] == local for a in jax.tree.leaves(engine.cache.latent))
    assert all(a.addressable_shards[0].data.shape[2] == local for a in jax.tree.leaves(engine.cache.index_keys))


@pytest.fixture(scope="module")
def fp8_reference(model, prompts, reference):
    """The FP8 cache's tokens with the reference kernels on one device (int8 indexer keys, fp8 latent rows)."""
    config = EngineConfig(num_speculative_tokens=3, kv_quant="fp8", **ENGINE)
    return [c.tokens for c in Engine(model, config).generate(requests(prompts, reference[1]))]


@pytest.mark.parametrize("layout", ["context4", "paged"])
def test_tpu_fp8_layout_gives_the_reference_fp8_tokens(prompts, reference, fp8_reference, layout):
    """The FP8 cache as TPU serving holds it (latent values packed in uint32 words, the rope tails of 8
    positions folded into a 128-lane row here, int8 indexer keys packed four positions per word along the
    sequence), read by the Pallas TPU kernels (interpret mode), gives the reference kernels' FP8 tokens with
    speculative decoding (k = 3): split over context 4 (x tensor 2; 16 positions, 4 key words per shard), and
    paged on one device (pages of 128, which the TPU scores kernel reads through the page tables: 3 pages for
    2 slots, so slots and pages do not line up). Rows are quantized as written, so the numbers are the same
    on any mesh and in any layout."""
    config = dict(num_speculative_tokens=3, kv_quant="fp8", **ENGINE)
    model = load(attention_impl="pallas_tpu", interpret=True)
    if layout == "paged":  # the TPU indexer kernel reads pages of >= 128 positions through the tables
        with pytest.raises(InputError, match="multiple of 128"):
            Engine(model, EngineConfig(page_size=8, num_pages=16, **config))
        engine = Engine(model, EngineConfig(**{**config, "max_len": 256}, page_size=128, num_pages=3))
    else:
        mesh = make_mesh({"context": 4, "tensor": 2})
        engine = Engine(shard_model(model, mesh), EngineConfig(kv_seq_axes=("context",), **config), mesh=mesh)
        keys = engine.cache.index_keys[0]
        assert keys.sequence_packed and keys.values.addressable_shards[0].data.shape[2] == ENGINE["max_len"] // 16
    assert [c.tokens for c in engine.generate(requests(prompts, reference[1]))] == fp8_reference


def test_mtp_drafts_equal_the_multi_step_mtp_of_training(model, prompts):
    """After prefill the slot's k drafts are what backbone(mtp_steps=k) predicts at the prompt's last row when
    fed the drafts themselves: step s uses the first step's top-k and KV (IndexShare + KVShare)."""
    k = 3
    engine = Engine(model, EngineConfig(num_speculative_tokens=k, **ENGINE))
    prompt = prompts[1]
    [first] = engine._prefill([(0, Request("0", tuple(prompt), SamplingParams(temperature=0.0), "completion"))])
    drafts = [int(t) for t in np.asarray(engine.state.drafts[0])]
    seq = jnp.asarray([prompt + [first] + drafts[:-1]], jnp.int32)
    out = nnx.jit(lambda m, i: m.backbone(i, mtp_steps=k))(model, seq)
    row = len(prompt) - 1
    want = [int(jnp.argmax(model.head(h[:, row]), -1)[0]) for h in out.mtp_hidden]
    assert drafts == want


def test_continuous_batching_gives_each_request_its_tokens_alone(model, prompts):
    """Sampled requests (seeded) come out the same whether they share the slots or run one at a time."""
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, draft_sampling="sample", **ENGINE))
    reqs = [Request(str(i), tuple(p), SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.95, top_k=40,
                                                     seed=100 + i), "completion") for i, p in enumerate(prompts)]
    together = [c.tokens for c in engine.generate(reqs)]
    alone = [engine.generate([r])[0].tokens for r in reqs]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(reqs)


BATCHED = {"plain": (0, {}), "speculative-paged": (3, dict(page_size=8, num_pages=28)),
           "sampled": (2, dict(draft_sampling="sample"))}


@pytest.mark.parametrize("k,extra", BATCHED.values(), ids=BATCHED.keys())
def test_batched_prefill_gives_each_request_its_tokens(model, prompts, reference, k, extra):
    """Three requests prefilled together (four rows: one padding) in chunks of 16, their prompts of 1, 2 and
    3 chunks (rows whose prompt is done write nothing), then the fourth alone: the reference's greedy tokens,
    plainly, and speculatively with a paged cache; seeded sampling with sampled drafts gives the tokens of
    the requests prefilled one at a time. (On meshes: test_paged_cache_gives_the_slot_cache_tokens.)"""
    want, stop = reference
    reqs = requests(prompts, stop)
    config = dict(num_speculative_tokens=k, **{**ENGINE, "slots": 4}, **extra)
    if extra.get("draft_sampling") == "sample":  # against one-at-a-time prefill in the same slots
        reqs = [Request(str(i), tuple(p), SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.95, seed=7 + i),
                        "completion") for i, p in enumerate(prompts)]
        want = [c.tokens for c in Engine(model, EngineConfig(**config)).generate(reqs)]
    engine = Engine(model, EngineConfig(**config, prefill_batch=3))
    prefill = engine._prefill
    calls = []
    engine._prefill = lambda admitted: calls.append(len(admitted)) or prefill(admitted)
    assert [c.tokens for c in engine.generate(reqs)] == want
    assert calls == [3, 1]


def test_page_allocator_gives_each_sequence_shard_its_range_of_positions():
    """Split over 2 slot groups x 2 sequence shards (pool parts of 4 pages), a slot's logical pages 0-3 come
    from its group's first shard's part and 4-7 from the second's; a request waits when a shard's part it
    needs is full even if the other has room, and one that needs more than a slot holds can never run."""
    alloc = PageAllocator(16, 8, slots=4, max_pages=8, groups=2, seq_shards=2)
    alloc.assign(2, 6 * 8)  # slot 2: group 1 (parts 2 and 3), 6 pages: 4 on shard 0, 2 on shard 1
    assert list(alloc.table[2]) == [8, 9, 10, 11, 12, 13, -1, -1]
    # Every request starts on shard 0: group 1's is full, so slot 3 waits although shard 1 has 2 pages free.
    assert not alloc.fits(3, 8)
    assert alloc.fits(0, 8 * 8)  # group 0 is empty
    with pytest.raises(InputError, match="each sequence shard of a slot group holds 4 pages"):
        alloc.check("x", 8 * 8 + 1)  # 9 pages: more than a slot's table
    alloc.release(2)
    assert alloc.free_pages == 16 and (alloc.table == -1).all()
    alloc.assign(3, 8)
    assert list(alloc.table[3][:1]) == [8]  # the part's lowest page first again


def test_requests_that_cannot_fit_are_refused(model):
    engine = Engine(model, EngineConfig(**ENGINE))
    with pytest.raises(InputError, match="exceeds the engine's max_len 64"):
        engine.check(Request("x", tuple(range(2, 60)), SamplingParams(max_tokens=10), "completion"))
    with pytest.raises(InputError, match="no MTP layer"):
        Engine(glmjax.load_pretrained(GOLDEN / "allfull_nomtp"), EngineConfig(num_speculative_tokens=2))
    paged = Engine(model, EngineConfig(page_size=8, num_pages=4, **ENGINE))  # 32 tokens in all
    with pytest.raises(InputError, match="need 5 pages of 8 tokens; the cache holds 4 pages.*can never run"):
        paged.check(Request("y", tuple(range(2, 30)), SamplingParams(max_tokens=10), "completion"))
    paged.check(Request("z", tuple(range(2, 24)), SamplingParams(max_tokens=10), "completion"))  # 32: fits
    with pytest.raises(InputError, match="multiple of page_size"):
        EngineConfig(slots=2, max_len=60, page_size=8)


PAGED = {"one-device": (0, 9, None), "tensor2xexpert2": (3, 16, {"tensor": 2, "expert": 2}),
         "context2xtensor2xexpert2": (3, 32, {"context": 2, "tensor": 2, "expert": 2})}


@pytest.mark.parametrize("k,num_pages,shape", PAGED.values(), ids=PAGED.keys())
def test_paged_cache_gives_the_slot_cache_tokens(model, prompts, reference, k, num_pages, shape):
    """Pages of 8 tokens through a page table give the reference's (= the slot cache's) tokens: plain on one
    device, where with 9 pages the 54-token request (prompt 40 + 14: 7 pages) cannot start next to the others
    and waits for their pages; speculative on a tensor 2 x expert 2 mesh, where the pools are split over
    expert (8 pages per slot group, each slot's pages on its devices; a prefill chunk, whose one request is
    not split, merges over the groups); and speculative with the cache split over context 2 as well, each
    sequence shard holding the pages of its half of every slot's positions (8 pages per device: the exact
    distributed top-k and the log-sum-exp merge over the shards, as for the slot cache). On the meshes the
    first two requests are prefilled together (EngineConfig.prefill_batch). Every page is back in the pool
    at the end."""
    want, stop = reference
    config = EngineConfig(num_speculative_tokens=k, page_size=8, num_pages=num_pages, prefill_batch=2 if shape else 1,
                          **ENGINE)
    if shape:
        mesh = make_mesh(shape, jax.devices()[:int(np.prod(list(shape.values())))])
        engine = Engine(shard_model(load(), mesh), config, mesh=mesh)
        assert engine.cache.latent[0].addressable_shards[0].data.shape[2] == 8
    else:
        engine = Engine(model, config)
    assert engine.cache.paged and engine.cache.latent[0].shape[2:4] == (num_pages, 8)
    assert [c.tokens for c in engine.generate(requests(prompts, stop))] == want
    assert engine.pages.free_pages == num_pages and (engine.pages.table == -1).all()
    assert (engine.stats["waited"] > 0) == (shape is None)


def test_cache_rows_past_a_slots_length_are_never_read(model, prompts):
    """Rolling back is only a length: filling every cache row past the lengths with garbage changes nothing."""
    engine = Engine(model, EngineConfig(num_speculative_tokens=3, **ENGINE))
    reqs = requests(prompts[:1], -1)
    want = engine.generate(reqs)[0].tokens
    engine.cache = jax.tree.map(lambda a: jnp.full_like(a, 1e4), engine.cache)
    assert engine.generate(reqs)[0].tokens == want


def test_unscanned_layers_serve_the_same_tokens_as_scanned(tmp_path):
    """ModelOptions.scan_layers=False (how serve.py loads) on a config of 2 stacked IndexShare groups: the same
    checkpoint loads group by group and gives the scanned model's logits and tokens."""
    from tests.conftest import three_layer_indexshare_config

    cfg = three_layer_indexshare_config().replace(num_hidden_layers=4, first_k_dense_replace=0)
    scanned = glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(q_block=16), rngs=nnx.Rngs(0))
    assert [s.num_groups for s in scanned.segments] == [2]
    glmjax.save_pretrained(scanned, tmp_path)
    flat = glmjax.load_pretrained(tmp_path, options=glmjax.ModelOptions(q_block=16, scan_layers=False))
    assert [s.num_groups for s in flat.segments] == [1, 1]
    ids = jnp.asarray(np.random.default_rng(1).integers(2, cfg.vocab_size, (2, 24)), jnp.int32)
    logits = nnx.jit(lambda m, i: m(i).logits)
    np.testing.assert_allclose(logits(flat, ids), logits(scanned, ids), rtol=1e-5, atol=1e-5)
    prompts = [[int(t) for t in ids[0, :n]] for n in (7, 20)]
    reqs = [Request(str(i), tuple(p), SamplingParams(max_tokens=8, temperature=0.0), "completion")
            for i, p in enumerate(prompts)]
    engine = EngineConfig(slots=2, max_len=32, prefill_chunk=16, num_speculative_tokens=2)
    out = [[c.tokens for c in Engine(m, engine).generate(reqs)] for m in (scanned, flat)]
    assert out[0] == out[1]
