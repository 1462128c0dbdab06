"""TrainConfig: everything one training run needs, as typed frozen sections read from a TOML preset.

    python train.py --config configs/train/demo --set optimizer.peak_lr=1e-3 --set run.steps=200

A preset is a TOML file (`configs/train/<name>.toml`; the suffix may be left out) with one table per
section: [model], [mesh], [data], [optimizer], [loss], [checkpoint], [run] (and [demo] for the demo;
checkpoint.directory defaults to run.output_dir/checkpoints). `--set section.field=value`
overrides one field; the value is read as a TOML value (numbers, booleans, "strings", [lists]) and, when it
is not one, as a bare string. An unknown section or field, or a value of the wrong type, is a ConfigError
naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from glmjax.errors import ConfigError
from glmjax.sharding import MESH_AXES
from glmjax.train.checkpointing import CheckpointConfig
from glmjax.train.data import DataConfig
from glmjax.train.optimizer import STAGES, OptimizerConfig
from glmjax.train.sections import check_fields

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "train"


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the model comes from and how it computes.

    config: a config.json (HF format) for a model trained from scratch; checkpoint: an HF checkpoint
    directory to start from (its config.json is used). Exactly one is set, or `demo` builds the demo's
    config from its tokenizer (train.py's demo). dtype / param_dtype: compute and stored (master) dtypes;
    attention_impl, moe_gmm_impl, remat, q_block, moe_capacity_factor: glmjax.ModelOptions."""

    config: str = ""
    checkpoint: str = ""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention_impl: Literal["reference", "pallas_tpu", "pallas_gpu"] = "reference"
    moe_gmm_impl: Literal["megablox", "ragged_dot", "tiled", ""] = ""
    remat: Literal["none", "nothing", "layer_input", "attention"] = "none"
    q_block: int = 128
    moe_capacity_factor: float = 2.0

    def __post_init__(self):
        if self.config and self.checkpoint:
            raise ConfigError("model.config / model.checkpoint: give one of them, not both")
        if self.q_block < 1:
            raise ConfigError(f"model.q_block: must be >= 1, got {self.q_block}")
        if not self.moe_capacity_factor > 0:
            raise ConfigError(f"model.moe_capacity_factor: must be positive, got {self.moe_capacity_factor}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective (docs/training.md has the exact forms).

    z_loss: weight of logsumexp^2 on the LM logits. mtp_steps: steps of the MTP layer (0: none); step s
    predicts token t+2+s with the first step's top-k and KV (IndexShare + KVShare). mtp_weight: lambda; the
    steps' cross-entropies weigh lambda / mtp_steps each. indexer_weight: weight of the DSA indexer's KL
    (stage sparse; ignored in "full"). balance_weight: DeepSeek-V3's sequence-wise balance loss.
    bias_update_rate: gamma of the aux-loss-free router bias update after each step (0: off). loss_chunk:
    tokens per cross-entropy chunk. mtp_tv_weight: weight of the end-to-end acceptance loss of the MTP drafts,
    1 - E[accepted drafts] / mtp_steps under multi-step rejection sampling (0: off; docs/training.md)."""

    z_loss: float = 0.0
    mtp_steps: int = 1
    mtp_weight: float = 0.3
    indexer_weight: float = 1.0
    balance_weight: float = 1e-4
    bias_update_rate: float = 1e-3
    loss_chunk: int = 2048
    mtp_tv_weight: float = 0.0

    def __post_init__(self):
        for name in ("z_loss", "mtp_weight", "indexer_weight", "balance_weight", "bias_update_rate",
                     "mtp_tv_weight"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"loss.{name}: must be a finite number >= 0, got {v!r}")
        if self.mtp_steps < 0:
            raise ConfigError(f"loss.mtp_steps: must be >= 0, got {self.mtp_steps}")
        if self.loss_chunk < 1:
            raise ConfigError(f"loss.loss_chunk: must be >= 1, got {self.loss_chunk}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop. stage: "dense_warmup" (only the indexers train, on their KL to the dense attention),
    "sparse" (everything; the indexer on its KL over the selected keys) or "full" (everything, no indexer
    loss). steps: optimizer steps of this run (resume continues to it). output_dir: metrics, plots,
    checkpoints (unless checkpoint.directory is set) and the exported HF model. eval_every / eval_batches:
    validation cadence and size (0: none). export_hf: save an HF checkpoint (floating weights in
    export_dtype; the router bias stays float32) at the end."""

    stage: Literal["dense_warmup", "sparse", "full"] = "sparse"
    steps: int = 1000
    seed: int = 0
    output_dir: str = "runs/train"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    export_hf: bool = True
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"run.stage: must be one of {STAGES}, got {self.stage!r}")
        for name, lo in (("steps", 1), ("log_every", 1), ("eval_every", 0), ("eval_batches", 0), ("seed", 0)):
            if getattr(self, name) < lo:
                raise ConfigError(f"run.{name}: must be >= {lo}, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The embedded demo's corpus: the Python standard library's .py sources on this machine. The trainer
    trains a byte-level BPE tokenizer of `tokenizer_vocab` tokens on them (run.output_dir/tokenizer.json),
    holds out `validation_fraction` of the files, and fills data.train_files, validation_files, tokenizer
    and eos_id, and the model config's vocab_size, from it."""

    tokenizer_vocab: int = 2048
    validation_fraction: float = 0.05

    def __post_init__(self):
        if self.tokenizer_vocab < 260:
            raise ConfigError(f"demo.tokenizer_vocab: must be >= 260 (bytes + specials), got {self.tokenizer_vocab}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"demo.validation_fraction: must be in (0, 1), got {self.validation_fraction}")


DEMO_FILES = ("python-stdlib",)  # data.train_files of a demo preset until the trainer fills them in


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    mesh: Mapping[str, int]
    data: DataConfig
    optimizer: OptimizerConfig
    loss: LossConfig
    checkpoint: CheckpointConfig
    run: RunConfig
    demo: DemoConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = dict(v) if isinstance(v, Mapping) else _plain(dataclasses.asdict(v))
        return out


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------------ loading

_SECTIONS = {"model": ModelSection, "data": DataConfig, "optimizer": OptimizerConfig, "loss": LossConfig,
             "checkpoint": CheckpointConfig, "run": RunConfig, "demo": DemoConfig}


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """value coerced to the annotated type tp (int -> float, list -> tuple), else a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(where, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, Sequence) or tp in (tuple,):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_check_type(f"{where}[{i}]", x, inner) for i, x in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _section(name: str, cls: type, values: Any):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected a table of fields, got {values!r}")
    check_fields(cls, values, name)
    hints = typing.get_type_hints(cls)
    kwargs = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Sections that name themselves by class (DataConfig.x) are reported by their table name.
        raise ConfigError(str(e).replace(f"{cls.__name__}.", f"{name}.", 1)) from None


def _mesh(values: Any) -> dict[str, int]:
    if not isinstance(values, Mapping):
        raise ConfigError(f"mesh: expected a table of axis sizes, got {values!r}")
    out = {}
    for axis, size in values.items():
        if axis not in MESH_AXES:
            raise ConfigError(f"mesh.{axis}: unknown mesh axis (known: {', '.join(MESH_AXES)})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"mesh.{axis}: must be an integer >= 1, got {size!r}")
        out[axis] = size
    return out


def preset_path(name_or_path: str | Path) -> Path:
    """A preset file: a path (with or without .toml), or a name in configs/train/."""
    p = Path(name_or_path)
    for cand in (p, Path(f"{p}.toml"), PRESETS / p, PRESETS / f"{p}.toml"):  # not with_suffix: "glm-5.2-..."
        if cand.is_file():
            return cand
    raise ConfigError(f"--config: no preset {str(name_or_path)!r} (presets: "
                      f"{', '.join(sorted(q.stem for q in PRESETS.glob('*.toml')))})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """"section.field=value" -> (["section", "field"], value): value as TOML, else a bare string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def load_train_config(preset: str | Path | None = None, overrides: Sequence[str] = (),
                      base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Reads a preset (or starts from `base`), applies `--set` overrides, validates every section."""
    if preset is not None:
        path = preset_path(preset)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    else:
        raw = {}
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in {**(base or {}), **raw}.items()}
    for text in overrides:
        (section, field), value = parse_override(text)
        if section not in _SECTIONS and section != "mesh":
            raise ConfigError(f"--set {text!r}: unknown section {section!r} "
                              f"(known: {', '.join(sorted([*_SECTIONS, 'mesh']))})")
        raw.setdefault(section, {})[field] = value
    unknown = set(raw) - set(_SECTIONS) - {"mesh"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section (known: {', '.join(sorted([*_SECTIONS, 'mesh']))})")
    run = _section("run", RunConfig, raw.get("run", {}))
    ckpt = dict(raw.get("checkpoint", {})) if isinstance(raw.get("checkpoint", {}), Mapping) else raw["checkpoint"]
    if isinstance(ckpt, dict):
        ckpt.setdefault("directory", str(Path(run.output_dir) / "checkpoints"))
    raw["checkpoint"] = ckpt
    sections = {name: _section(name, cls, raw.get(name, {}))
                for name, cls in _SECTIONS.items() if name not in ("data", "demo", "run")}
    sections["run"] = run
    demo = _section("demo", DemoConfig, raw["demo"]) if "demo" in raw else None
    data = dict(raw.get("data", {}))
    if demo is not None:
        data.setdefault("train_files", list(DEMO_FILES))
    elif "data" not in raw:
        raise ConfigError("data: the [data] section is required")
    sections["data"] = _section("data", DataConfig, data)
    return TrainConfig(mesh=_mesh(raw.get("mesh", {})), demo=demo, **sections)
