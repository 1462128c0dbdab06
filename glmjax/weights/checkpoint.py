"""Hugging Face checkpoints in (BF16, FP32, block-FP8) and out.

`load_pretrained` builds the model abstractly, checks the checkpoint against it (every tensor present,
none unexpected, every shape right) before reading any data, then creates each parameter with
`jax.make_array_from_callback`: every device shard is assembled from memory-mapped tensors, slice by
slice, so the weights are never held twice and a multi-host mesh reads only its own shards.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from glmjax.config import ConfigError, GlmMoeDsaConfig
from glmjax.model import GlmMoeDsa, ModelOptions
from glmjax.sharding import param_sharding
from glmjax.weights.mapping import CHECKPOINT_VARS, ParamPlan, build_plans, iter_hf_keys
from glmjax.weights.safetensors_io import SafetensorsFile, SafetensorsFormatError, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight_scale_inv" beside "<name>.weight"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor or file at fault."""


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


class HFCheckpoint:
    """A checkpoint directory: config.json plus model.safetensors, or shards listed by the index json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        try:
            self.config = GlmMoeDsaConfig.from_json(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(f"{self.path}/config.json: {e}") from None
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        elif (self.path / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE_NAME} nor {INDEX_NAME} is there")
        root = self.path.resolve()
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if weight_map is None:
            self._open(SINGLE_NAME)
            self._where = {k: SINGLE_NAME for k in self._files[SINGLE_NAME].keys()}
        else:
            for key, fname in weight_map.items():
                target = (self.path / fname).resolve()
                if os.path.isabs(fname) or root not in target.parents:
                    raise CheckpointError(f"{index}: entry {key!r} points outside the checkpoint: {fname!r}")
                if fname not in self._files:
                    if not target.exists():
                        raise CheckpointError(f"{index}: shard {fname!r} (holding {key!r}) does not exist")
                    self._open(fname)
                if key not in self._files[fname].keys():
                    raise CheckpointError(f"{index}: {key!r} is listed in {fname!r} but that file lacks it")
                self._where[key] = fname

    def _open(self, fname: str) -> None:
        try:
            self._files[fname] = SafetensorsFile(self.path / fname)
        except SafetensorsFormatError as e:
            raise CheckpointError(str(e)) from None

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
            scale_key = key + SCALE_SUFFIX
            if ckpt.dtype(key).name.startswith("float8"):
                if self.fp8 is None:
                    raise CheckpointError(f"{key}: stored as {ckpt.dtype(key)} but config.json has no "
                                          "quantization_config")
                if scale_key not in present:
                    raise CheckpointError(f"{key}: FP8 weight without its block scales {scale_key!r}")
                want = tuple(math.ceil(s / b) for s, b in zip(shape, self.fp8.block_size, strict=True))
                if ckpt.shape(scale_key) != want:
                    raise CheckpointError(f"{scale_key}: shape {list(ckpt.shape(scale_key))}, expected "
                                          f"{list(want)} for {list(shape)} in {self.fp8.block_size} blocks")
                needed.add(scale_key)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{ckpt.path}: missing tensors: {', '.join(missing[:5])}{more}")
        unexpected = sorted(k for k in present - needed if not _redundant_key(k, cfg))
        if unexpected:
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise CheckpointError(f"{ckpt.path}: unexpected tensors: {', '.join(unexpected[:5])}{more}")

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


def _options(dtype, options: ModelOptions | None) -> ModelOptions:
    if options is None:
        dtype = jnp.bfloat16 if dtype is None else dtype
        return ModelOptions(dtype=dtype, param_dtype=dtype)
    if dtype is not None and (jnp.dtype(dtype) != options.dtype or jnp.dtype(dtype) != options.param_dtype):
        raise ValueError(f"load_pretrained: dtype={jnp.dtype(dtype).name} conflicts with options (dtype="
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
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. '5GB', '200MB', or bytes)")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(model: GlmMoeDsa, path: str | Path, *, max_shard_size: int | str = "5GB") -> None:
    """Writes the model in the Hugging Face layout (per-expert keys, MTP as model.layers.{L + i}): config.json
    plus model.safetensors, or numbered shards and model.safetensors.index.json. Tensors are written in the
    parameters' dtypes; a model loaded from FP8 is saved dequantized (no quantization_config)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    plans = build_plans(model)
    values = dict(nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARS)))
    entries = [(key, plan, idx) for key, plan, idx in iter_hf_keys(plans)]
    limit = _parse_size(max_shard_size)
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
    elif (path / INDEX_NAME).exists():
        (path / INDEX_NAME).unlink()
    dtypes = {p.dtype for p in plans}
    main = jnp.dtype(model.options.param_dtype).name
    cfg = model.config.replace(quantization_config=None, dtype=main if main in {d.name for d in dtypes} else None)
    cfg.to_json(path / "config.json")
