"""Checkpoint I/O (glmjax.weights): exact round trips, block-FP8 dequantization, sliced and sharded reads,
and errors that name the tensor or file at fault. Golden fixtures are never modified: every corruption is
made on a copy under tmp_path."""

import json
import math
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import glmjax
from glmjax.weights.checkpoint import INDEX_NAME, SINGLE_NAME, HFCheckpoint, WeightReader
from glmjax.weights.mapping import CHECKPOINT_VARS, build_plans
from glmjax.weights.safetensors_io import SafetensorsFile, write_safetensors
from tests.conftest import GOLDEN

F32 = glmjax.ModelOptions(dtype=jnp.float32, param_dtype=jnp.float32)
BF16 = glmjax.ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------------------------- helpers


def params(model) -> dict:
    """path -> numpy array of every checkpointed variable (params and the router bias)."""
    state = nnx.state(model, CHECKPOINT_VARS)
    return {path: np.asarray(jax.device_get(v[...])) for path, v in nnx.to_flat_state(state)}


def assert_bit_identical(a: np.ndarray, b: np.ndarray, what=""):
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)), what


def assert_same_params(m1, m2):
    p1, p2 = params(m1), params(m2)
    assert p1.keys() == p2.keys()
    for path in p1:
        assert_bit_identical(p1[path], p2[path], str(path))


def hf_tensors(path) -> dict[str, np.ndarray]:
    ck = HFCheckpoint(path)
    return {k: np.array(ck.tensor(k)) for k in ck.keys()}


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(GOLDEN / name, dst)
    return dst


def rewrite(file, edit):
    """Rewrites a safetensors file through `edit(list of (name, array)) -> list`. Written to a new inode and
    renamed over, so no live memory map sees the file change under it."""
    st = SafetensorsFile(file)
    tensors = [(k, np.array(st.tensor(k))) for k in st.keys()]
    del st
    tmp = file.with_name(file.name + ".tmp")
    write_safetensors(tmp, edit(tensors))
    os.replace(tmp, file)


def abstract_model(cfg, opts=F32):
    return nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, opts, rngs=nnx.Rngs(0)))


def dequant(ck: HFCheckpoint, key: str, block=(128, 128)) -> np.ndarray:
    """Reference block-FP8 dequantization: w * scale_inv, one scale per 128x128 block (edge blocks partial)."""
    w = np.asarray(ck.tensor(key)).astype(np.float32)
    s = np.asarray(ck.tensor(key + "_scale_inv"), np.float32)
    assert s.shape == tuple(math.ceil(n / b) for n, b in zip(w.shape, block, strict=True))
    full = np.repeat(np.repeat(s, block[0], axis=0), block[1], axis=1)[: w.shape[0], : w.shape[1]]
    return w * full


def expect_error(path, *needles, cls=glmjax.CheckpointError, **kw):
    with pytest.raises(cls) as ei:
        glmjax.load_pretrained(path, **kw)
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message: {msg}"
    return msg


@pytest.fixture(scope="module")
def freq_f32():
    return glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=F32)


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_float32_sharded_save(freq_f32, tmp_path):
    out = tmp_path / "saved"
    glmjax.save_pretrained(freq_f32, out, max_shard_size="60KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (out / SINGLE_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    # every tensor of the original checkpoint, bit for bit, under the same key (experts split, MTP as layer 7)
    orig, saved = hf_tensors(GOLDEN / "indexshare_freq"), hf_tensors(out)
    assert saved.keys() == orig.keys()
    assert "model.layers.3.mlp.experts.15.gate_proj.weight" in saved
    assert "model.layers.7.mlp.experts.0.down_proj.weight" in saved
    assert "model.layers.7.eh_proj.weight" in saved
    for k in orig:
        assert_bit_identical(saved[k], orig[k], k)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in saved.values())
    for s in shards:  # no shard's tensors over the limit unless it holds a single tensor
        keys = SafetensorsFile(s).keys()
        assert sum(saved[k].nbytes for k in keys) <= 60_000 or len(keys) == 1

    again = glmjax.load_pretrained(out, options=F32)
    assert_same_params(freq_f32, again)


def test_round_trip_bfloat16_single_file(tmp_path):
    model = glmjax.load_pretrained(GOLDEN / "bf16", dtype=jnp.bfloat16)
    dtypes = {path: v.dtype for path, v in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS))}
    assert dtypes[("norm", "weight")] == jnp.bfloat16
    bias = [p for p in dtypes if p[-1] == "e_score_correction_bias"]
    assert bias and all(dtypes[p] == jnp.float32 for p in bias)

    out = tmp_path / "saved"
    out.mkdir()
    (out / INDEX_NAME).write_text("{}")  # a stale index from an earlier sharded save must go
    glmjax.save_pretrained(model, out, max_shard_size="1GB")
    assert (out / SINGLE_NAME).exists()
    assert not (out / INDEX_NAME).exists()
    assert not list(out.glob("model-*"))

    orig, saved = hf_tensors(GOLDEN / "bf16"), hf_tensors(out)
    assert saved.keys() == orig.keys()
    assert saved["model.layers.7.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert saved["model.layers.3.self_attn.q_b_proj.weight"].dtype == ml_dtypes.bfloat16
    for k in orig:
        assert_bit_identical(saved[k], orig[k], k)

    again = glmjax.load_pretrained(out, dtype=jnp.bfloat16)
    assert_same_params(model, again)


def test_layout_against_hf_keys(freq_f32):
    """Spelled out by hand (not through mapping.py): which HF tensor each glmjax parameter slice holds."""
    hf = HFCheckpoint(GOLDEN / "indexshare_freq")
    p = params(freq_f32)

    def t(key):
        return np.asarray(hf.tensor(key))

    layer = ("groups", "layers")
    cases = [
        (p[("embed_tokens", "weight")], t("model.embed_tokens.weight")),
        (p[("lm_head", "weight")], t("lm_head.weight").T),
        (p[("stacks", 0, *layer, 0, "self_attn", "o_proj", "weight")][0],
         t("model.layers.0.self_attn.o_proj.weight").T.reshape(4, 8, 32)),
        (p[("stacks", 0, *layer, 0, "self_attn", "q_b_proj", "weight")][0],
         t("model.layers.0.self_attn.q_b_proj.weight").T.reshape(24, 4, 24)),
        (p[("stacks", 1, *layer, 0, "self_attn", "indexer", "wq_b", "weight")][0],
         t("model.layers.1.self_attn.indexer.wq_b.weight").T.reshape(24, 16, 24)),
        (p[("stacks", 1, *layer, 1, "mlp", "experts", "down_proj")][0, 5],
         t("model.layers.2.mlp.experts.5.down_proj.weight").T),
        (p[("stacks", 2, *layer, 1, "mlp", "experts", "gate_proj")][0, 15],
         t("model.layers.5.mlp.experts.15.gate_proj.weight").T),
        (p[("stacks", 2, *layer, 2, "mlp", "gate", "e_score_correction_bias")][0],
         t("model.layers.6.mlp.gate.e_score_correction_bias")),
        (p[("mtp", 0, "decoder", "mlp", "experts", "up_proj")][9], t("model.layers.7.mlp.experts.9.up_proj.weight").T),
        (p[("mtp", 0, "eh_proj", "weight")], t("model.layers.7.eh_proj.weight").T),
        (p[("mtp", 0, "shared_head", "norm", "weight")], t("model.layers.7.shared_head.norm.weight")),
    ]
    for got, want in cases:
        np.testing.assert_array_equal(got, want)

    # several scanned groups: group g of the sparse stack is HF layer 1 + g
    ck = HFCheckpoint(GOLDEN / "allfull_nomtp")
    w = params(glmjax.load_pretrained(GOLDEN / "allfull_nomtp", options=F32))
    experts = w[("stacks", 1, *layer, 0, "mlp", "experts", "gate_proj")]
    assert experts.shape[:2] == (3, 8)
    for g in range(3):
        for e in (0, 7):
            want = np.asarray(ck.tensor(f"model.layers.{1 + g}.mlp.experts.{e}.gate_proj.weight")).T
            np.testing.assert_array_equal(experts[g, e], want)


# ------------------------------------------------------------------------------------------------- FP8


def test_fp8_dequantization_matches_reference():
    path = GOLDEN / "fp8"
    ck = HFCheckpoint(path)
    model = glmjax.load_pretrained(path, options=F32)
    p = params(model)
    plans = {pl.path: pl for pl in build_plans(model)}
    by_key = {str(pl.keys[idx]): (pl, idx) for pl in plans.values() for idx in np.ndindex(*pl.stack_shape)}
    quantized = [
        "model.layers.1.self_attn.q_b_proj.weight",  # [96, 136]: one partial row block, two column blocks
        "model.layers.2.mlp.experts.3.down_proj.weight",  # stacked expert, [160, 32]
        "model.layers.1.self_attn.kv_b_proj.weight",  # [160, 120] -> heads split
        "model.layers.0.self_attn.o_proj.weight",  # two input axes
        "model.layers.3.mlp.experts.1.gate_proj.weight",  # MTP layer
        "model.layers.0.mlp.down_proj.weight",  # [160, 200]: partial blocks on both axes
    ]
    for key in quantized:
        assert ck.dtype(key) == np.dtype(ml_dtypes.float8_e4m3fn), key
        scale = np.asarray(ck.tensor(key + "_scale_inv"))
        if scale.size > 1:
            assert len(np.unique(scale)) > 1, key  # otherwise a mix-up of blocks would go unnoticed
        plan, idx = by_key[key]
        ref = plan.to_leaf(dequant(ck, key))
        got = p[plan.path][idx]
        np.testing.assert_array_equal(got, ref, err_msg=key)
        # and the scale matters: the raw fp8 values alone are far off
        assert not np.allclose(got, plan.to_leaf(np.asarray(ck.tensor(key)).astype(np.float32)))

    # non-quantized bf16 tensors load exactly (bf16 -> float32 is exact)
    for key in ["model.layers.1.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias"]:
        assert ck.dtype(key) == np.dtype(ml_dtypes.bfloat16)
        plan, idx = by_key[key]
        np.testing.assert_array_equal(p[plan.path][idx], plan.to_leaf(np.asarray(ck.tensor(key), np.float32)))


def test_fp8_loads_in_bfloat16_and_saves_dequantized(tmp_path):
    model = glmjax.load_pretrained(GOLDEN / "fp8", dtype=jnp.bfloat16)
    ck = HFCheckpoint(GOLDEN / "fp8")
    key = "model.layers.1.self_attn.q_b_proj.weight"
    glmjax.save_pretrained(model, tmp_path / "out")
    saved = HFCheckpoint(tmp_path / "out")
    assert saved.config.quantization_config is None
    assert not any(k.endswith("_scale_inv") for k in saved.keys())
    assert saved.dtype(key) == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(saved.tensor(key)), dequant(ck, key).astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------- sliced reads


def _random_index(rng, shape):
    index = []
    for n in shape:
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        index.append(slice(a, b) if rng.random() < 0.8 else slice(None))
    return tuple(index)


@pytest.mark.parametrize("name", ["allfull_nomtp", "indexshare_pattern", "fp8"])
def test_sliced_reads_equal_slices_of_full_read(name):
    ck = HFCheckpoint(GOLDEN / name)
    plans = build_plans(abstract_model(ck.config))
    reader = WeightReader(ck, plans)
    rng = np.random.default_rng(0)
    stacked_layers = 0
    for plan in plans:
        full = reader.read(plan, ())
        assert full.shape == plan.shape and full.dtype == plan.dtype
        if plan.stack_shape and plan.stack_shape[0] > 1:
            stacked_layers += 1
        indices = [_random_index(rng, plan.shape) for _ in range(3)]
        # a proper sub-range of every dim at once (stacked layer/expert dims, partial columns)
        indices.append(tuple(slice(n // 3, n - n // 4) if n > 1 else slice(0, 1) for n in plan.shape))
        indices.append(tuple(slice(n - 1, n) for n in plan.shape))
        for index in indices:
            np.testing.assert_array_equal(reader.read(plan, index), full[index], err_msg=f"{plan.path} {index}")
    if name != "fp8":
        assert stacked_layers > 0  # the fixture exercises slicing across scanned layers


def test_fp8_reads_across_block_boundaries():
    ck = HFCheckpoint(GOLDEN / "fp8")
    plans = build_plans(abstract_model(ck.config))
    reader = WeightReader(ck, plans)
    plan = next(p for p in plans if p.path[0] == "stacks" and p.path[-2:] == ("q_a_proj", "weight"))
    assert plan.shape == (1, 160, 136)
    # leaf [in=160, out=136] = HF [136, 160].T: rows and columns cross the 128 block edge
    full = reader.read(plan, ())
    np.testing.assert_array_equal(full[0], dequant(ck, str(plan.keys[0])).T)
    for index in [(slice(0, 1), slice(120, 140), slice(100, 136)), (slice(None), slice(127, 129), slice(127, 129)),
                  (slice(None), slice(128, 160), slice(0, 128))]:
        np.testing.assert_array_equal(reader.read(plan, index), full[index])


# ------------------------------------------------------------------------------------------ sharding


def test_sharded_load_matches_unsharded(freq_f32):
    mesh = glmjax.sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    sharded = glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=F32, mesh=mesh)
    assert_same_params(freq_f32, sharded)
    state = dict(nnx.to_flat_state(nnx.state(sharded, CHECKPOINT_VARS)))
    experts = [p for p in state if "experts" in p and p[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert experts
    for path in experts:
        arr = state[path][...]
        assert arr.sharding.mesh.shape == mesh.shape
        spec = arr.sharding.spec
        assert spec != PartitionSpec() and any(s is not None for s in spec), (path, spec)
        assert "expert" in jax.tree.leaves(tuple(spec)), (path, spec)
        assert not arr.sharding.is_fully_replicated
        # each device holds only its part
        assert all(s.data.size < arr.size for s in arr.addressable_shards)


# -------------------------------------------------------------------------------------- memory: reads


def test_reads_are_per_parameter_shard(monkeypatch):
    reads = []
    original = WeightReader.read

    def spy(self, plan, index):
        out = original(self, plan, index)
        reads.append((out.nbytes, plan))
        return out

    monkeypatch.setattr(WeightReader, "read", spy)
    mesh = glmjax.sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model = glmjax.load_pretrained(GOLDEN / "indexshare_freq", options=F32, mesh=mesh)
    assert reads
    biggest_param = max(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    total = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert max(n for n, _ in reads) <= biggest_param < total
    for n, plan in reads:  # no read larger than its own parameter
        assert n <= math.prod(plan.shape) * plan.dtype.itemsize
    # sharded parameters are read shard by shard, not whole
    expert_reads = [n for n, plan in reads if len(plan.stack_shape) == 2]
    expert_full = max(math.prod(p.shape) * p.dtype.itemsize for _, p in reads if len(p.stack_shape) == 2)
    assert max(expert_reads) < expert_full


# --------------------------------------------------------------------------------------------- errors


def test_missing_tensor(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    key = "model.layers.4.mlp.experts.5.up_proj.weight"
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v) for k, v in ts if k != key])
    msg = expect_error(ckpt, key, "missing")
    assert msg.count("model.layers") == 1  # only the missing one is named


def test_unexpected_tensor(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    key = "model.layers.0.self_attn.bogus.weight"
    rewrite(ckpt / SINGLE_NAME, lambda ts: ts + [(key, np.zeros((3, 4), np.float32))])
    expect_error(ckpt, key, "unexpected")


def test_wrong_shape(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    key = "model.layers.3.self_attn.kv_b_proj.weight"
    good = SafetensorsFile(ckpt / SINGLE_NAME).shape(key)
    bad = (good[0], good[1] + 1)
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, np.zeros(bad, np.float32) if k == key else v) for k, v in ts])
    expect_error(ckpt, key, list(bad), list(good))


def test_absent_shard(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    (ckpt / "model-00003-of-00006.safetensors").unlink()
    expect_error(ckpt, "model-00003-of-00006.safetensors")


def test_index_key_not_in_its_shard(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    key = "model.norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    expect_error(ckpt, key, other)


@pytest.mark.parametrize("where", ["parent", "absolute", "nested_escape"])
def test_index_entry_outside_checkpoint(tmp_path, where):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    key = "model.layers.2.mlp.experts.4.up_proj.weight"
    shard = ckpt / index["weight_map"][key]
    evil = tmp_path / "evil.safetensors"  # a real, valid file: rejected for where it is, not for being absent
    shutil.copy(shard, evil)
    fname = {"parent": "../evil.safetensors", "absolute": str(evil),
             "nested_escape": "sub/../../evil.safetensors"}[where]
    index["weight_map"][key] = fname
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    expect_error(ckpt, key, fname, "outside")


def test_not_glm_moe_dsa(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "config.json", "model_type", "llama")


def test_no_weights_no_config_no_dir(tmp_path):
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    shutil.copy(GOLDEN / "indexshare_pattern" / "config.json", only_cfg)
    expect_error(only_cfg, SINGLE_NAME, INDEX_NAME)

    no_cfg = copy_fixture("indexshare_pattern", tmp_path)
    (no_cfg / "config.json").unlink()
    expect_error(no_cfg, "config.json")

    expect_error(tmp_path / "does_not_exist", "does_not_exist")


def test_fp8_missing_scale(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    scale = "model.layers.2.self_attn.q_b_proj.weight_scale_inv"
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v) for k, v in ts if k != scale])
    expect_error(ckpt, scale)


def test_fp8_scale_wrong_shape(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    scale = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"  # [2, 1] for [160, 32]
    rewrite(ckpt / SINGLE_NAME,
            lambda ts: [(k, np.ones((1, 1), np.float32) if k == scale else v) for k, v in ts])
    expect_error(ckpt, scale, "[1, 1]", "[2, 1]")


def test_fp8_weights_without_quantization_config(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "quantization_config", "float8")


def test_stray_scale_on_unquantized_weight(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    stray = "model.layers.1.mlp.gate.weight_scale_inv"  # the router is bf16: a scale there is unexpected
    rewrite(ckpt / SINGLE_NAME, lambda ts: ts + [(stray, np.ones((1, 2), np.float32))])
    expect_error(ckpt, stray, "unexpected")


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _huge_header_length(p):
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    p.write_bytes(bytes(data))


def _garbage_header(p):
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))


def _header_not_object(p):
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[:8] + b"[1, 2]".ljust(n) + data[8 + n:])


def _tiny(p):
    p.write_bytes(b"\x01\x02")


@pytest.mark.parametrize("corrupt", [_truncate, _huge_header_length, _garbage_header, _header_not_object, _tiny])
def test_corrupted_safetensors(tmp_path, corrupt):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    shard = "model-00002-of-00006.safetensors"
    corrupt(ckpt / shard)
    expect_error(ckpt, shard)


def test_redundant_mtp_copies_are_ignored(tmp_path):
    name = "indexshare_pattern"
    ckpt = copy_fixture(name, tmp_path)
    cfg = HFCheckpoint(ckpt).config
    L = cfg.num_hidden_layers
    assert cfg.num_nextn_predict_layers == 1
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    extra = [(f"model.layers.{L}.embed_tokens.weight", np.full((vocab, hidden), 7.0, np.float32)),
             (f"model.layers.{L}.shared_head.head.weight", np.full((vocab, hidden), -7.0, np.float32)),
             (f"model.layers.{L}.self_attn.rotary_emb.inv_freq", np.ones((4,), np.float32))]
    rewrite(ckpt / SINGLE_NAME, lambda ts: ts + extra)
    loaded = glmjax.load_pretrained(ckpt, options=F32)
    assert_same_params(glmjax.load_pretrained(GOLDEN / name, options=F32), loaded)

    # only for the MTP layers: the same copy one layer further is a stray tensor
    beyond = f"model.layers.{L + 1}.embed_tokens.weight"
    rewrite(ckpt / SINGLE_NAME, lambda ts: ts + [(beyond, np.zeros((vocab, hidden), np.float32))])
    expect_error(ckpt, beyond, "unexpected")
