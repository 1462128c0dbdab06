"""Hugging Face checkpoints in (BF16, FP32, block-FP8) and out.

`load_pretrained` checks the config's layer and expert counts against the tensor names on disk, builds the
model abstractly, checks the checkpoint against it (every tensor present, none unexpected, every shape and
dtype right) before reading any data, then creates each parameter with `jax.make_array_from_callback`:
every device shard is assembled from memory-mapped tensors, slice by slice, so the weights are never held
twice and a multi-host mesh reads only its own shards. Nothing is allocated in proportion to a config
number before it has been checked against the files. `save_pretrained` replaces a checkpoint atomically.
See docs/validation.md.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from glmjax.config import GlmMoeDsaConfig
from glmjax.errors import CheckpointError, ConfigError, InputError
from glmjax.files import read_text
from glmjax.model import GlmMoeDsa, ModelOptions
from glmjax.sharding import param_sharding
from glmjax.weights import atomic
from glmjax.weights.mapping import CHECKPOINT_VARS, ParamPlan, build_plans, iter_hf_keys
from glmjax.weights.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["CheckpointError", "HFCheckpoint", "WeightReader", "load_pretrained", "save_pretrained"]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight_scale_inv" beside "<name>.weight"

# What each tensor may be stored as. Weights: any float (cast to the parameter dtype on load), or FP8 of the
# format quantization_config names, with float32 block scales (as DeepSeek-V3 / GLM FP8 releases store them
# and transformers' FP8 linear allocates them). Integers or bools where a weight belongs are a broken export,
# not something to cast.
FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))
FP8_DTYPES = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}
SCALE_DTYPES = frozenset({np.dtype(np.float32)})


def _redundant_key(key: str, cfg: GlmMoeDsaConfig) -> bool:
    """Keys some exports carry that duplicate weights the model already has."""
    L = cfg.num_hidden_layers
    if key.endswith("rotary_emb.inv_freq"):
        return True
    if cfg.tie_word_embeddings and key == "lm_head.weight":
        return True
    m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)", key)
    # DeepSeek-style MTP layers may store copies of the main embedding and head.
    return bool(m) and L <= int(m.group(1)) < L + cfg.num_nextn_predict_layers


def _shard_name_error(fname) -> str | None:
    """Why an index entry's file name is not a file in the checkpoint directory (None if it is one).

    The boundary: the index names files *in* the directory (bare names, as every HF export writes them);
    where a symlink there leads is the user's filesystem, e.g. the Hugging Face cache, whose snapshot files
    link into ../../blobs/."""
    if not isinstance(fname, str):
        return f"expected a file name (a string), got {type(fname).__name__} {fname!r}"
    if fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\0" in fname or os.path.isabs(fname):
        return (f"{fname!r} points outside the checkpoint directory or below it: shards must be bare file names "
                "in the directory")
    return None


class HFCheckpoint:
    """A checkpoint directory: config.json plus model.safetensors, or shards listed by the index json.

    Only the headers are read here (and checked: see SafetensorsFile); tensors are memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.exists():
                raise CheckpointError(f"{self.path}: not a directory (a checkpoint is a directory)")
            raise CheckpointError(f"checkpoint directory not found: {self.path}"
                                  + atomic.interrupted_save_hint(self.path))
        try:
            self.config = GlmMoeDsaConfig.from_json(self.path / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        index, single = self.path / INDEX_NAME, self.path / SINGLE_NAME
        has_index, has_single = os.path.lexists(index), os.path.lexists(single)
        if has_index and has_single:
            # transformers would read model.safetensors, an index-first loader the shards: refuse to guess.
            raise CheckpointError(f"{self.path}: both {SINGLE_NAME} and {INDEX_NAME} are there, so it is "
                                  "ambiguous which weights it holds; remove the stale one")
        if not (has_index or has_single):
            raise CheckpointError(f"{self.path}: neither {SINGLE_NAME} nor {INDEX_NAME} is there")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if has_single:
            self._files[SINGLE_NAME] = SafetensorsFile(single)
            self._where = {k: SINGLE_NAME for k in self._files[SINGLE_NAME].keys()}
            return
        for key, fname in self._weight_map(index).items():
            if fname not in self._files:
                if not (self.path / fname).exists():
                    raise CheckpointError(f"{index}: shard {fname!r} (holding {key!r}) does not exist")
                self._files[fname] = SafetensorsFile(self.path / fname)  # a directory or FIFO: an error
            if key not in self._files[fname].keys():
                raise CheckpointError(f"{index}: {key!r} is listed in {fname!r} but that file lacks it")
            self._where[key] = fname

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            doc = json.loads(read_text(index, CheckpointError))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            got = type(doc).__name__ if not isinstance(doc, dict) else f"weight_map {type(weight_map).__name__}"
            raise CheckpointError(f"{index}: not a safetensors index: expected an object whose \"weight_map\" "
                                  f"maps tensor names to shard file names, got {got}")
        for key, fname in weight_map.items():
            why = _shard_name_error(fname)
            if why:
                raise CheckpointError(f"{index}: entry {key!r}: {why}")
        return weight_map

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _file(self, key: str) -> SafetensorsFile:
        return self._files[self._where[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._file(key).dtype(key)

    def tensor(self, key: str) -> np.ndarray:
        """Read-only memory-mapped view."""
        return self._file(key).tensor(key)


class WeightReader:
    """Reads glmjax parameter slices out of an HFCheckpoint, dequantizing block-FP8 weights on the fly."""

    def __init__(self, ckpt: HFCheckpoint, plans: list[ParamPlan]):
        self.ckpt = ckpt
        self.cfg = ckpt.config
        self.fp8 = self.cfg.fp8
        self.plans = plans
        self._validate()

    def _validate(self) -> None:
        ckpt, cfg = self.ckpt, self.cfg
        present = set(ckpt.keys())
        needed: set[str] = set()
        missing = []
        for key, plan, _ in iter_hf_keys(self.plans):
            needed.add(key)
            if key not in present:
                missing.append(key)
                continue
            shape = ckpt.shape(key)
            if shape != plan.hf_shape:
                raise CheckpointError(
                    f"{key}: shape {list(shape)} in the checkpoint, the config implies {list(plan.hf_shape)}"
                )
            if self._check_dtype(key, shape):
                needed.add(key + SCALE_SUFFIX)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{ckpt.path}: missing tensors: {', '.join(missing[:5])}{more}")
        unexpected = sorted(k for k in present - needed if not _redundant_key(k, cfg))
        if unexpected:
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise CheckpointError(f"{ckpt.path}: unexpected tensors: {', '.join(unexpected[:5])}{more}")

    def _check_dtype(self, key: str, shape: tuple[int, ...]) -> bool:
        """Checks the stored dtype of `key` (and of its block scales if FP8); True if it is FP8."""
        ckpt, dt = self.ckpt, self.ckpt.dtype(key)
        if dt in FLOAT_DTYPES:
            return False
        if not dt.name.startswith("float8"):
            raise CheckpointError(f"{key}: stored as {dt.name}; a weight must be floating point (F32, BF16, F16, "
                                  "F64, or FP8 with block scales), not integer or bool")
        if self.fp8 is None:
            raise CheckpointError(f"{key}: stored as {dt} but config.json has no quantization_config")
        if dt != FP8_DTYPES[self.fp8.fmt]:
            raise CheckpointError(f"{key}: stored as {dt.name} but quantization_config.fmt is {self.fp8.fmt!r} "
                                  f"({FP8_DTYPES[self.fp8.fmt].name}): its values would be misread")
        if len(shape) != 2:
            raise CheckpointError(f"{key}: stored as {dt.name} with shape {list(shape)}; block-FP8 is for 2-D "
                                  "weights only")
        scale_key = key + SCALE_SUFFIX
        if scale_key not in ckpt:
            raise CheckpointError(f"{key}: FP8 weight without its block scales {scale_key!r}")
        want = tuple(math.ceil(s / b) for s, b in zip(shape, self.fp8.block_size, strict=True))
        if ckpt.shape(scale_key) != want:
            raise CheckpointError(f"{scale_key}: shape {list(ckpt.shape(scale_key))}, expected "
                                  f"{list(want)} for {list(shape)} in {self.fp8.block_size} blocks")
        if ckpt.dtype(scale_key) not in SCALE_DTYPES:
            raise CheckpointError(f"{scale_key}: block scales stored as {ckpt.dtype(scale_key).name}, expected "
                                  "float32")
        return True

    def _hf_region(self, key: str, rows: slice, cols: slice | None) -> np.ndarray:
        """float32/bf16 values of an HF tensor region (rows, cols in HF coordinates), dequantized if FP8."""
        t = self.ckpt.tensor(key)
        region = t[rows] if cols is None else t[rows, cols]
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self.ckpt:
            return np.asarray(region)
        b0, b1 = self.fp8.block_size
        r = np.arange(t.shape[0])[rows] // b0
        c = np.arange(t.shape[1])[cols if cols is not None else slice(None)] // b1
        scale = np.asarray(self.ckpt.tensor(scale_key), np.float32)
        return region.astype(np.float32) * scale[np.ix_(r, c)]

    def read(self, plan: ParamPlan, index: tuple[slice, ...]) -> np.ndarray:
        """The slice `index` of the parameter, in the parameter's dtype."""
        index = tuple(index) + (slice(None),) * (len(plan.shape) - len(index))
        ns = len(plan.stack_shape)
        stack_idx, leaf_idx = index[:ns], index[ns:]
        ranges = [range(*s.indices(n)) for s, n in zip(stack_idx, plan.stack_shape, strict=True)]
        leaf_shape = tuple(len(range(*s.indices(n))) for s, n in zip(leaf_idx, plan.leaf_shape, strict=True))
        out = np.empty(tuple(len(r) for r in ranges) + leaf_shape, dtype=plan.dtype)
        for pos, idx in zip(np.ndindex(*(len(r) for r in ranges)), itertools.product(*ranges), strict=True):
            out[pos] = self._read_leaf(plan, str(plan.keys[idx]), leaf_idx)
        return out

    def _read_leaf(self, plan: ParamPlan, key: str, leaf_idx: tuple[slice, ...]) -> np.ndarray:
        if plan.linear and len(plan.leaf_shape) == 2:
            # glmjax [in, out] = HF [out, in].T: read only the region this slice needs.
            return self._hf_region(key, leaf_idx[1], leaf_idx[0]).T.astype(plan.dtype)
        if not plan.linear:  # norms, biases (1-D) and the embedding (2-D), stored as in the file
            return self._hf_region(key, leaf_idx[0], leaf_idx[1] if len(leaf_idx) == 2 else None).astype(plan.dtype)
        # Linear weights split into head axes: read the HF tensor whole, then reshape and slice.
        full = self._hf_region(key, slice(None), slice(None) if len(self.ckpt.shape(key)) == 2 else None)
        return plan.to_leaf(full)[leaf_idx].astype(plan.dtype)


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _check_counts(ckpt: HFCheckpoint) -> None:
    """The config numbers that multiply the number of tensors (layers, routed experts), against the tensor
    names on disk, in O(tensors in the files). Runs before the model or a plan per tensor is built, so a
    config that declares a million experts fails here instead of allocating for them; every other size is a
    shape, which the abstract model carries for free and WeightReader checks against the headers."""
    cfg = ckpt.config
    layers: set[int] = set()
    experts: dict[int, set[int]] = defaultdict(set)
    for key in ckpt.keys():
        if m := _LAYER_KEY.match(key):
            layers.add(int(m.group(1)))
        if m := _EXPERT_KEY.match(key):
            experts[int(m.group(1))].add(int(m.group(2)))
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if n_layers > len(layers):
        raise CheckpointError(f"{ckpt.path}: config.json declares {n_layers} decoder layers (num_hidden_layers "
                              f"{cfg.num_hidden_layers} + num_nextn_predict_layers {cfg.num_nextn_predict_layers}) "
                              f"but the checkpoint holds tensors for {len(layers)}")
    most = max(map(len, experts.values()), default=0)
    if ("sparse" in cfg.mlp_schedule or cfg.num_nextn_predict_layers) and cfg.n_routed_experts > most:
        raise CheckpointError(f"{ckpt.path}: config.json declares n_routed_experts {cfg.n_routed_experts} but the "
                              f"checkpoint holds at most {most} experts in any layer")


def _options(dtype, options: ModelOptions | None) -> ModelOptions:
    if options is None:
        dtype = jnp.bfloat16 if dtype is None else dtype
        return ModelOptions(dtype=dtype, param_dtype=dtype)
    if dtype is not None and (jnp.dtype(dtype) != options.dtype or jnp.dtype(dtype) != options.param_dtype):
        raise InputError(f"load_pretrained: dtype={jnp.dtype(dtype).name} conflicts with options (dtype="
                         f"{options.dtype.name}, param_dtype={options.param_dtype.name}); pass one of them")
    return options


def load_pretrained(path: str | Path, dtype=None, *, options: ModelOptions | None = None,
                    mesh: Mesh | None = None, rules: Mapping[str, tuple[str, ...]] | None = None) -> GlmMoeDsa:
    """Loads a Hugging Face glm_moe_dsa checkpoint directory into a GlmMoeDsa.

    dtype: the parameter and compute dtype (default bfloat16; FP8 weights are dequantized to it; the router
    bias and the indexer's weights_proj stay float32). options: full ModelOptions instead; giving both is
    an error unless options.dtype and options.param_dtype equal dtype.
    mesh/rules: place each variable directly in its sharded layout (logical rules, see glmjax.sharding).
    """
    opts = _options(dtype, options)
    ckpt = HFCheckpoint(path)
    _check_counts(ckpt)
    abstract = nnx.eval_shape(lambda: GlmMoeDsa(ckpt.config, opts, rngs=nnx.Rngs(0)))
    plans = build_plans(abstract)
    reader = WeightReader(ckpt, plans)
    by_path = {p.path: p for p in plans}
    new_values = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, CHECKPOINT_VARS)):
        plan = by_path[path]
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = param_sharding(var, mesh, rules, "/".join(map(str, path)))
        new_values[path] = jax.make_array_from_callback(
            plan.shape, sharding, lambda idx, plan=plan: reader.read(plan, idx)
        )
    nnx.update(abstract, nnx.traversals.unflatten_mapping(new_values))
    return abstract


def _parse_size(size: int | str) -> int:
    n = None
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())):
        n = int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])
    if n is None or n < 1:
        raise InputError(f"max_shard_size: cannot use {size!r} (a positive size: '5GB', '200MB', or bytes)")
    return n


def save_pretrained(model: GlmMoeDsa, path: str | Path, *, max_shard_size: int | str = "5GB") -> None:
    """Writes the model in the Hugging Face layout (per-expert keys, MTP as model.layers.{L + i}): config.json
    plus model.safetensors, or numbered shards and model.safetensors.index.json. Tensors are written in the
    parameters' dtypes; a model loaded from FP8 is saved dequantized (no quantization_config).

    Atomic: the checkpoint is written complete into a hidden sibling directory, then swapped in (see
    weights/atomic.py), so `path` holds the old checkpoint or the new one whenever the process dies, never a
    mix. Files in an existing `path` that are not checkpoint files (tokenizer, generation config, README)
    are kept; its old weights, index and config are not."""
    limit = _parse_size(max_shard_size)
    target = Path(path)
    if target.is_symlink():  # replace the directory the link names, not the link
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.new_sibling(target, atomic.SAVING_INFIX)
    try:
        _write_checkpoint(model, staging, limit)
        if target.exists():
            _keep_other_files(target, staging)
        for p in staging.iterdir():
            if p.is_file() and not p.is_symlink():
                atomic.fsync_path(p)
        atomic.fsync_path(staging)
        atomic.replace_dir(staging, target)
    finally:
        atomic.remove_tree(staging)  # the unfinished checkpoint, or the old one after the swap


def _checkpoint_files(directory: Path) -> set[str]:
    """The names in `directory` that belong to a checkpoint: replaced by a save, never carried over."""
    names = {CONFIG_NAME, SINGLE_NAME, INDEX_NAME}
    names |= {p.name for p in directory.iterdir() if SHARD_NAME.fullmatch(p.name)}
    try:  # shards under other names that an old index lists
        names |= {f for f in HFCheckpoint._weight_map(directory / INDEX_NAME).values()}
    except CheckpointError:
        pass
    return names


def _keep_other_files(old: Path, new: Path) -> None:
    """Hard-links (or copies) into `new` what `old` holds besides the checkpoint itself."""
    owned = _checkpoint_files(old)
    for src in old.iterdir():
        if src.name in owned:
            continue
        dst = new / src.name
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_checkpoint(model: GlmMoeDsa, path: Path, limit: int) -> None:
    """The checkpoint files, into the empty directory `path`."""
    plans = build_plans(model)
    values = dict(nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS)))
    entries = [(key, plan, idx) for key, plan, idx in iter_hf_keys(plans)]
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[1].hf_shape) * e[1].dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        meta = {key: (plan.hf_shape, plan.dtype) for key, plan, _ in shard}

        def tensors(shard=shard):
            for key, plan, idx in shard:
                leaf = np.asarray(jax.device_get(values[plan.path][...][idx]))
                yield key, plan.to_hf(leaf)

        write_safetensors(path / fname, tensors(), shapes_dtypes=meta)
        for key, plan, _ in shard:
            weight_map[key] = fname
            total += math.prod(plan.hf_shape) * plan.dtype.itemsize
    if n > 1:
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    dtypes = {p.dtype for p in plans}
    main = jnp.dtype(model.options.param_dtype).name
    cfg = model.config.replace(quantization_config=None, dtype=main if main in {d.name for d in dtypes} else None)
    cfg.to_json(path / CONFIG_NAME)
