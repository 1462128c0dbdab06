"""Trustworthy checkpoints and inputs (docs/validation.md): the Hugging Face cache layout loads, saves are
atomic, wrong dtypes and out-of-range values are refused, nothing hangs or allocates for a number it has
not checked, and every bad input gives an error naming the field, file or argument. Golden fixtures are
never modified: every change is made on a copy under tmp_path."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import struct
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import glmjax
import serve
from glmjax.config import FIELD_RULES, GlmMoeDsaConfig
from glmjax.errors import CheckpointError, ConfigError, GlmjaxError, InputError
from glmjax.model.inputs import check_prompts
from glmjax.weights import atomic, checkpoint
from glmjax.weights.checkpoint import INDEX_NAME, SINGLE_NAME, HFCheckpoint
from glmjax.weights.mapping import CHECKPOINT_VARS
from glmjax.weights.safetensors_io import SafetensorsFile, SafetensorsFormatError, write_safetensors
from tests.conftest import GOLDEN, REPO
from tests.test_weights import F32, assert_same_params, copy_fixture, hf_tensors, rewrite

TINY = REPO / "configs" / "tiny-demo.json"


def base_config() -> dict:
    return json.loads(TINY.read_text())


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def expect(cls, fn, *needles):
    with pytest.raises(cls) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message: {msg}"
    return msg


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fails the test instead of hanging it (a FIFO opened for reading blocks until a writer comes)."""
    def fail(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -------------------------------------------------------------------------- 1. the Hugging Face cache layout


def hf_cache_copy(name, tmp_path):
    """tmp/models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>}, as huggingface_hub
    lays out a download."""
    repo = tmp_path / f"models--zai-org--{name}"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((GOLDEN / name).iterdir())):
        blob = f"{i:040x}"
        shutil.copy(f, blobs / blob)
        os.symlink(f"../../blobs/{blob}", snap / f.name)
    return snap


@pytest.mark.parametrize("name", ["indexshare_freq", "indexshare_pattern"])  # sharded, single file
def test_hf_cache_layout_loads(tmp_path, name):
    snap = hf_cache_copy(name, tmp_path)
    assert all(p.is_symlink() for p in snap.iterdir())
    loaded = glmjax.load_pretrained(snap, options=F32)
    assert_same_params(glmjax.load_pretrained(GOLDEN / name, options=F32), loaded)


@pytest.mark.parametrize("fname", ["sub/model-00001-of-00006.safetensors", "..", "", "C:\\evil.safetensors"])
def test_index_entries_must_be_files_in_the_directory(tmp_path, fname):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    (ckpt / "sub").mkdir()
    shutil.copy(ckpt / "model-00001-of-00006.safetensors", ckpt / "sub")
    index = json.loads((ckpt / INDEX_NAME).read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00006.safetensors")
    index["weight_map"][key] = fname
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    expect(CheckpointError, lambda: HFCheckpoint(ckpt), key, repr(fname), "outside")


def test_single_file_and_index_together_are_ambiguous(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    shutil.copy(GOLDEN / "indexshare_pattern" / SINGLE_NAME, ckpt)
    expect(CheckpointError, lambda: HFCheckpoint(ckpt), SINGLE_NAME, INDEX_NAME, "ambiguous")


# ---------------------------------------------------------------------------------------- 2. atomic saves


@pytest.fixture(scope="module")
def two_models():
    """Two models of one shape with different weights (loading a fixture is much faster than initialising)."""
    a, b = (glmjax.load_pretrained(GOLDEN / "allfull_nomtp", options=F32) for _ in range(2))
    nnx.update(b, jax.tree.map(lambda v: v + 1, nnx.state(b, CHECKPOINT_VARS)))
    return a, b


def saved_as(path, model, **kw):
    glmjax.save_pretrained(model, path, **kw)
    return hf_tensors(path)


def assert_tensors(path, expected):
    got = hf_tensors(path)
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def staging_dirs(target):
    return sorted(target.parent.glob(f".{target.name}.*"))


class Crash(Exception):
    pass


SINGLE, SHARDED, SHARDED2 = "1GB", "60KB", "40KB"


@pytest.mark.parametrize("old_size,new_size,crash_at", [
    *[(SINGLE, SHARDED, c) for c in ("file0", "file1", "file3", "config", "swap")],
    *[(SHARDED, SINGLE, c) for c in ("file0", "config", "swap")],
    (SHARDED, SHARDED2, "file2"),
])
@pytest.mark.parametrize("killed", [False, True])  # killed: no cleanup runs
def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, two_models, old_size, new_size, crash_at,
                                                    killed):
    old_model, new_model = two_models
    target = tmp_path / "ckpt"
    old = saved_as(target, old_model, max_shard_size=old_size)
    assert (target / INDEX_NAME).exists() == (old_size != SINGLE)
    (target / "tokenizer.json").write_text("{}")

    written = []
    real_write = checkpoint.write_safetensors

    def write(path, *a, **kw):
        if crash_at == f"file{len(written)}":
            path.write_bytes(b"partial")  # a half-written file in the staging directory
            raise Crash
        written.append(path)
        return real_write(path, *a, **kw)

    def crash(*a, **kw):
        raise Crash

    monkeypatch.setattr(checkpoint, "write_safetensors", write)
    if crash_at == "config":
        monkeypatch.setattr(GlmMoeDsaConfig, "to_json", crash)
    if crash_at == "swap":
        monkeypatch.setattr(atomic, "replace_dir", crash)
    if killed:
        monkeypatch.setattr(atomic, "remove_tree", lambda p: None)
    with pytest.raises(Crash):
        glmjax.save_pretrained(new_model, target, max_shard_size=new_size)
    assert_tensors(target, old)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert bool(staging_dirs(target)) == killed  # a killed save leaves only a hidden sibling behind


def test_save_replaces_the_whole_checkpoint_and_keeps_other_files(tmp_path, two_models):
    a, b = two_models
    target = tmp_path / "ckpt"
    saved_as(target, a, max_shard_size=SINGLE)
    (target / "tokenizer.json").write_text("tok")
    (target / "extras").mkdir()
    (target / "extras" / "notes.txt").write_text("n")

    new = saved_as(target, b, max_shard_size=SHARDED)  # sharded over single: no stale model.safetensors
    assert not (target / SINGLE_NAME).exists()
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 2
    assert_same_params(b, glmjax.load_pretrained(target, options=F32))

    glmjax.save_pretrained(a, target, max_shard_size=SHARDED2)  # a different shard set: the old one goes
    index = json.loads((target / INDEX_NAME).read_text())
    assert {p.name for p in target.glob("model-*")} == set(index["weight_map"].values())
    glmjax.save_pretrained(b, target, max_shard_size=SINGLE)  # single over sharded
    assert not list(target.glob("model-*")) and not (target / INDEX_NAME).exists()
    assert_tensors(target, new)
    assert (target / "tokenizer.json").read_text() == "tok" and (target / "extras" / "notes.txt").exists()
    assert not staging_dirs(target)


def test_save_arguments_and_permissions(tmp_path, two_models):
    a, _ = two_models
    target = tmp_path / "new" / "ckpt"
    for size in ("5 parsecs", 0, True):
        expect(InputError, lambda size=size: glmjax.save_pretrained(a, target, max_shard_size=size), "max_shard_size")
    assert not target.parent.exists()  # refused before touching the disk
    old_umask = os.umask(0o022)
    try:
        glmjax.save_pretrained(a, target)
    finally:
        os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o755  # a new directory's mode, not a temporary one's 0700
    target.chmod(0o750)
    glmjax.save_pretrained(a, target)
    assert target.stat().st_mode & 0o777 == 0o750  # kept
    (tmp_path / "file").write_text("x")
    expect(CheckpointError, lambda: glmjax.save_pretrained(a, tmp_path / "file"), "not a directory")
    expect(CheckpointError, lambda: glmjax.load_pretrained(tmp_path / "file"), "not a directory")


def test_save_without_an_atomic_exchange(tmp_path, monkeypatch, two_models):
    a, b = two_models
    monkeypatch.setattr(atomic, "_exchange", lambda x, y: False)  # e.g. macOS: two renames
    target = tmp_path / "ckpt"
    old = saved_as(target, a)
    new = saved_as(target, b)
    assert not staging_dirs(target)

    real_rename = os.rename

    def rename(src, dst):  # fail the second rename (staging -> target)
        if atomic.SAVING_INFIX in str(src):
            raise Crash
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(Crash):
        glmjax.save_pretrained(a, target)
    assert_tensors(target, new)  # rolled back
    assert old.keys() == new.keys()

    # Killed between the two renames: the target is gone, and the loader says where the old one is.
    moved = tmp_path / ".ckpt.old-x1y2"
    real_rename(target, moved)
    expect(CheckpointError, lambda: HFCheckpoint(target), "not found", str(moved))


# -------------------------------------------------------------------------------------------- 3. dtypes


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_integer_or_bool_weight_is_refused(tmp_path, dtype):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    key = "model.layers.3.self_attn.kv_b_proj.weight"
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v.astype(dtype) if k == key else v) for k, v in ts])
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), key, np.dtype(dtype).name)


@pytest.mark.parametrize("dtype", [np.int32, ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16])
def test_fp8_scale_must_be_float32(tmp_path, dtype):
    ckpt = copy_fixture("fp8", tmp_path)
    scale = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v.astype(dtype) if k == scale else v) for k, v in ts])
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), scale, np.dtype(dtype).name, "float32")


def test_fp8_format_must_match_the_config(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    key = "model.layers.1.self_attn.q_b_proj.weight"
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v.view(ml_dtypes.float8_e5m2) if k == key else v) for k, v in ts])
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), key, "float8_e5m2", "e4m3")

    norm = "model.layers.1.input_layernorm.weight"  # FP8 needs a 2-D weight with block scales
    rewrite(ckpt / SINGLE_NAME, lambda ts: [(k, v.view(ml_dtypes.float8_e4m3fn) if k == key else
                                            v.astype(ml_dtypes.float8_e4m3fn) if k == norm else v) for k, v in ts])
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), norm, "2-D")


def raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("change,needle", [
    ({"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "overlap"),
    ({"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlap"),  # duplicate range
    ({"b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, "unused bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, "shape"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2, 10**30], "data_offsets": [0, 8]}}, "inconsistent offsets"),
    ({"__metadata__": ["x"]}, "__metadata__"),
])
def test_safetensors_header_is_checked(tmp_path, change, needle):
    f = raw_safetensors(tmp_path / "x.safetensors", {**GOOD, **change}, bytes(16))
    expect(SafetensorsFormatError, lambda: SafetensorsFile(f), str(f), needle)


def test_safetensors_trailing_bytes_and_duplicate_names(tmp_path):
    assert SafetensorsFile(raw_safetensors(tmp_path / "ok.safetensors", GOOD, bytes(12))).keys() == ["a", "b"]
    f = raw_safetensors(tmp_path / "long.safetensors", GOOD, bytes(20))
    expect(SafetensorsFormatError, lambda: SafetensorsFile(f), "8 bytes after the last tensor")
    f = tmp_path / "dup.safetensors"
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    expect(SafetensorsFormatError, lambda: SafetensorsFile(f), "'a' twice")


def test_overlapping_tensors_in_a_checkpoint_name_the_shard(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    shard = ckpt / "model-00005-of-00006.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]  # alias the first tensor's bytes
    header[keys[1]]["shape"] = header[keys[0]]["shape"]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    shard.write_bytes(data[:8] + blob + data[8 + n:])
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), shard.name, "overlap")


# ------------------------------------------------------------------------------------ 4. values: config


@pytest.mark.parametrize("change,field", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_parameters.rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1e4}}, "rope_parameters.rope_theta"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0}}, "rope_parameters.factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4, "mscale": float("nan")}},
     "rope_parameters.mscale"),
    ({"rope_parameters": None, "rope_theta": float("inf")}, "rope_theta"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"initializer_range": -0.1}, "initializer_range"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"eos_token_id": [1, -2]}, "eos_token_id"),
    ({"index_topk_freq": 2.5}, "index_topk_freq"),
    ({"norm_topk_prob": 1}, "norm_topk_prob"),
    ({"vocab_size": "512"}, "vocab_size"),
    ({"num_attention_heads": 4.0}, "num_attention_heads"),
    ({"indexer_types": "full"}, "indexer_types"),
    ({"rope_parameters": "yarn"}, "rope_parameters"),
    ({"quantization_config": "fp8"}, "quantization_config"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}},
     "quantization_config.weight_block_size"),
])
def test_config_values_are_checked(change, field):
    d = {**base_config(), **change}
    msg = expect(ConfigError, lambda: GlmMoeDsaConfig.from_hf_dict(d), field)
    assert msg.startswith(field)


def test_every_config_field_has_a_rule():
    assert set(FIELD_RULES) == {f.name for f in dataclasses.fields(GlmMoeDsaConfig)} - {"extra"}


def test_config_json_errors_name_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(base_config())[:-1] + ', "rms_norm_eps": NaN}')  # json reads NaN
    expect(ConfigError, lambda: glmjax.load_config(f), str(f), "rms_norm_eps")
    f.write_text("[1, 2]")
    expect(ConfigError, lambda: glmjax.load_config(f), str(f), "JSON object", "list")
    f.write_bytes(b"\xff\xfe")
    expect(ConfigError, lambda: glmjax.load_config(f), str(f), "UTF-8")


# ------------------------------------------------------------------------------------ 4. values: forward


@pytest.fixture(scope="module")
def tiny_model(two_models):
    return two_models[0]


@pytest.mark.parametrize("bad", [128, 99999, -1])
def test_out_of_range_ids_are_refused_in_eager_calls(tiny_model, bad):
    ids = jnp.asarray([[5, 17, bad]], jnp.int32)
    expect(InputError, lambda: tiny_model(ids), "input_ids", str(bad), "vocab_size=128")
    expect(InputError, lambda: tiny_model.backbone(np.asarray(ids)), "input_ids", str(bad))


def test_prompts_are_checked_before_decoding(tiny_model):
    from glmjax.serve import greedy_decode_reference
    expect(InputError, lambda: greedy_decode_reference(tiny_model, [[1, 2], [3, 200]], 2), "prompts[1][1]", "200")
    expect(InputError, lambda: greedy_decode_reference(tiny_model, [[1, 2]], 10**9), "max_position_embeddings")
    expect(InputError, lambda: greedy_decode_reference(tiny_model, [[1, 2]], -1), "max_new_tokens")
    expect(InputError, lambda: greedy_decode_reference(tiny_model, [[]], 1), "prompts[0]")
    expect(InputError, lambda: greedy_decode_reference(tiny_model, [["1"]], 1), "prompts[0][0]", "str")


I32 = jnp.int32


@pytest.mark.parametrize("args,needle", [
    (dict(input_ids=[[1, 2]]), "input_ids: expected an array"),
    (dict(input_ids=jnp.zeros((1, 0), I32)), "T must be >= 1"),
    (dict(input_ids=jnp.zeros((4,), I32)), "rank 2"),
    (dict(input_ids=jnp.zeros((1, 4, 1), I32)), "rank 2"),
    (dict(input_ids=jnp.zeros((1, 4), jnp.float32)), "integer dtype"),
    (dict(attention_mask=jnp.ones((1, 5), I32)), "attention_mask: shape [1, 5]"),
    (dict(attention_mask=jnp.ones((1, 4), jnp.float32)), "attention_mask: expected bool or integer"),
    (dict(positions=jnp.zeros((4,), I32)), "positions: shape [4]"),
    (dict(positions=jnp.zeros((1, 4), jnp.float32)), "positions: expected integer"),
    (dict(segment_ids=jnp.zeros((2, 4), I32)), "segment_ids: shape [2, 4]"),
    (dict(segment_ids=jnp.ones((1, 4), bool)), "segment_ids: expected integer"),
])
def test_forward_arguments_are_checked(tiny_model, args, needle):
    kw = {"input_ids": jnp.zeros((1, 4), I32), **args}
    expect(InputError, lambda: tiny_model(**kw), needle)


def test_jitted_callers_get_static_checks_only(tiny_model):
    """Under jit the values are tracers: shapes, ranks and dtypes are checked at trace time, ids are not."""
    graphdef, state = nnx.split(tiny_model)

    def logits(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    expect(InputError, lambda: jax.eval_shape(logits, state, jax.ShapeDtypeStruct((1, 4, 1), I32)), "rank 2")
    out = jax.eval_shape(logits, state, jnp.asarray([[5, 99999]], I32))  # traced: not checked (documented)
    assert out.shape == (1, 2, 128)
    bad = jnp.asarray([[5, 99999]], I32)  # closed over: a concrete constant of the program, checked
    expect(InputError, lambda: jax.eval_shape(lambda s: nnx.merge(graphdef, s)(bad).logits, state), "99999")


# ------------------------------------------------------------------------------------ 5. resource bounds


def test_million_experts_fail_before_allocating(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    edit_config(ckpt, n_routed_experts=1_000_000)
    t0 = time.perf_counter()
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), "n_routed_experts", "1000000", "8 experts")
    assert time.perf_counter() - t0 < 5


def test_more_layers_than_the_files_hold(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    edit_config(ckpt, num_hidden_layers=4000)
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), "num_hidden_layers 4000", "tensors for 8")


@pytest.mark.parametrize("which", ["config.json", SINGLE_NAME, "shard", INDEX_NAME])
def test_fifo_is_refused_not_read(tmp_path, which):
    ckpt = copy_fixture("indexshare_pattern" if which in ("config.json", SINGLE_NAME) else "indexshare_freq",
                        tmp_path)
    name = "model-00003-of-00006.safetensors" if which == "shard" else which
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    with no_hang():
        expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), name, "not a regular file", "FIFO")


def test_fifo_behind_a_symlink_is_refused(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    os.mkfifo(tmp_path / "pipe")
    (ckpt / SINGLE_NAME).unlink()
    os.symlink(tmp_path / "pipe", ckpt / SINGLE_NAME)
    with no_hang():
        expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), "not a regular file")


def test_shard_that_is_a_directory(tmp_path):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    shard = ckpt / "model-00002-of-00006.safetensors"
    shard.unlink()
    shard.mkdir()
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), shard.name, "a directory")


# ------------------------------------------------------------------------------------ 6. obscure errors


@pytest.mark.parametrize("weight_map,needle", [
    ([["model.norm.weight", "model-00001-of-00006.safetensors"]], "weight_map list"),
    ({"model.norm.weight": 3}, "got int 3"),
    ({"model.norm.weight": None}, "got NoneType None"),
    ("model.safetensors", "weight_map str"),
])
def test_malformed_index(tmp_path, weight_map, needle):
    ckpt = copy_fixture("indexshare_freq", tmp_path)
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), INDEX_NAME, needle)
    (ckpt / INDEX_NAME).write_text("[]")
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), INDEX_NAME, "got list")


def test_config_errors_through_the_loader_name_file_and_field(tmp_path):
    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    edit_config(ckpt, rope_parameters="default")
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), str(ckpt / "config.json"), "rope_parameters")
    (ckpt / "config.json").write_text("[]")
    expect(CheckpointError, lambda: glmjax.load_pretrained(ckpt), "config.json", "JSON object")


def test_error_family():
    for cls in (ConfigError, CheckpointError, InputError, SafetensorsFormatError):
        assert issubclass(cls, GlmjaxError) and issubclass(cls, ValueError)
    assert glmjax.ConfigError is ConfigError and glmjax.CheckpointError is CheckpointError


# ------------------------------------------------------------------------------------ 7. the command line


def run_cli(capsys, *argv):
    try:
        rc = serve.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,needle", [
    (["--prompt-ids", "5,x,7"], "--prompt-ids"),
    (["--prompt-ids", "5,,7"], "--prompt-ids"),
    (["--prompt-ids", "5;-3"], "--prompt-ids"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-new-tokens", "1e3"], "--max-new-tokens"),
    (["--mesh", "tensor=two"], "--mesh"),
    (["--input", "requests.jsonl"], "--output"),
])
def test_cli_argument_syntax(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_cli_checks_before_loading(capsys, monkeypatch, tmp_path):
    def never(*a, **kw):
        raise AssertionError("the model must not be built or loaded")

    monkeypatch.setattr(glmjax, "load_pretrained", never)
    monkeypatch.setattr(serve, "demo_checkpoint", never)
    for argv, needle in [(["--prompt-ids", "5,17,99999"], "99999"),
                         (["--max-new-tokens", "1000000000"], "max_position_embeddings=4096"),
                         (["--max-len", "5000"], "max_position_embeddings=4096"),
                         (["--prompt-ids", "1,2", "--max-len", "3", "--max-new-tokens", "2"], "--max-len 3"),
                         (["--checkpoint", str(tmp_path / "none")], "not found")]:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 1 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err

    ckpt = copy_fixture("indexshare_pattern", tmp_path)
    edit_config(ckpt, rms_norm_eps=-1)
    rc, out, err = run_cli(capsys, "--checkpoint", str(ckpt), "--prompt-ids", "1,2")
    assert rc == 1 and err.count("\n") == 1 and "rms_norm_eps" in err and "config.json" in err


def test_check_prompts_direct():
    cfg = glmjax.load_config(TINY)
    check_prompts(cfg, [[0, 511]], cfg.max_position_embeddings - 2)
    expect(InputError, lambda: check_prompts(cfg, "1,2", 1), "prompts")
    expect(InputError, lambda: check_prompts(cfg, [[1]], True), "max_new_tokens")


def test_only_empty_tensors(tmp_path):
    f = tmp_path / "empty.safetensors"
    write_safetensors(f, [("e", np.zeros((0, 3), np.float32))])
    assert SafetensorsFile(f).tensor("e").shape == (0, 3)


def test_writer_round_trip_still_exact(tmp_path):
    f = tmp_path / "w.safetensors"
    arrays = [("x", np.arange(6, dtype=np.float32).reshape(2, 3)), ("e", np.zeros((0,), np.float32)),
              ("y", np.ones((3,), ml_dtypes.bfloat16))]
    write_safetensors(f, arrays)
    st = SafetensorsFile(f)
    for k, v in arrays:
        np.testing.assert_array_equal(st.tensor(k), v)
