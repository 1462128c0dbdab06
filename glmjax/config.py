"""Typed, frozen GLM-MoE-DSA configuration, 1:1 with Hugging Face `config.json`.

`GlmMoeDsaConfig` holds every field transformers 5.23 reads for `model_type == "glm_moe_dsa"` under the same
name and with the same default; fields it does not know are kept verbatim in `extra`, so
`GlmMoeDsaConfig.from_hf_dict(d).to_hf_dict()` writes back what was read. Derived values (the per-layer
indexer and MLP schedules, the rope parameters, the FP8 block size) are computed exactly as transformers
derives them and validated once, here; model code never reads raw JSON. Validation is declarative: every
field has a `Rule` in FIELD_RULES (type, null, range), then `_validate` checks relations between fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from glmjax.errors import ConfigError
from glmjax.files import read_text

__all__ = ["ConfigError", "Fp8Spec", "GlmMoeDsaConfig", "RopeSpec", "Rule", "load_config"]

MODEL_TYPE = "glm_moe_dsa"
# The schedules are Python tuples of num_hidden_layers entries, built while the config is validated (before
# any checkpoint is looked at): a bound keeps a typo from building a billion-entry tuple. GLM-5.2 has 78.
MAX_LAYERS = 4096


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters after transformers' standardization (default or yarn)."""

    rope_type: Literal["default", "yarn"]
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    """Block-wise FP8 quantization of the checkpoint (`quantization_config`)."""

    fmt: Literal["e4m3"]
    block_size: tuple[int, int]


def _tuple_or_none(v: Any) -> tuple | None:
    return None if v is None else tuple(v)


# Python ints and floats only (what json gives): a numpy scalar would pass here and fail in to_json.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one config value may be: its JSON kind, whether null is allowed, and for numbers (each element of
    a list of ints) the range. Floats must also be finite: json reads NaN and Infinity without complaint."""

    kind: Literal["int", "float", "bool", "str", "ints", "strs", "str|strs", "int|ints", "object"]
    optional: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def _range(self) -> str:
        lo = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        hi = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        return " and ".join(b for b in (lo, hi) if b)

    def _in_range(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def check(self, name: str, v: Any) -> None:
        """Raises ConfigError naming `name` unless `v` fits the rule."""
        if v is None:
            if self.optional:
                return
            raise ConfigError(f"{name}: must not be null")
        kinds = self.kind.split("|")
        seq = isinstance(v, list | tuple)
        if "int" in kinds and _is_int(v) or "ints" in kinds and seq and all(_is_int(x) for x in v):
            values = list(v) if seq else [v]
        elif "float" in kinds and _is_number(v):
            if not math.isfinite(v):
                raise ConfigError(f"{name}: must be a finite number, got {v!r}")
            values = [v]
        elif ("bool" in kinds and isinstance(v, bool) or "str" in kinds and isinstance(v, str)
              or "strs" in kinds and seq and all(isinstance(x, str) for x in v)
              or "object" in kinds and isinstance(v, Mapping)):
            return
        else:
            want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "ints": "a list of integers", "strs": "a list of strings", "object": "a JSON object"}
            raise ConfigError(f"{name}: expected {' or '.join(want[k] for k in kinds)}, got "
                              f"{type(v).__name__} {v!r}")
        bad = [x for x in values if not self._in_range(x)]
        if bad:
            raise ConfigError(f"{name}: must be {self._range()}, got {bad[0]!r}")


def _check_fields(obj: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> None:
    """Checks every key of `obj` that `rules` knows; keys it does not know pass (kept for the round trip)."""
    for key, rule in rules.items():
        if key in obj:
            rule.check(prefix + key, obj[key])


@dataclasses.dataclass(frozen=True)
class GlmMoeDsaConfig:
    # Field names, order and defaults follow transformers' GlmMoeDsaConfig; `None` means "absent".
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 2048
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 202752
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    mlp_bias: bool = False
    head_dim: int | None = None  # transformers overwrites it with qk_rope_head_dim; informative only
    first_k_dense_replace: int = 3
    # IndexShare schedule: `indexer_types` wins, then `index_topk_pattern`, then freq/offset.
    indexer_types: tuple[str, ...] | None = None
    index_topk_pattern: str | tuple[str, ...] | None = None
    index_topk_freq: int | None = None
    index_skip_topk_offset: int | None = None
    mlp_layer_types: tuple[str, ...] | None = None
    layer_types: tuple[str, ...] | None = None
    # Rope: transformers 5 writes `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
    rope_parameters: Mapping[str, Any] | None = None
    rope_theta: float | None = None
    rope_scaling: Mapping[str, Any] | None = None
    num_nextn_predict_layers: int = 0
    quantization_config: Mapping[str, Any] | None = None
    model_type: str = MODEL_TYPE
    architectures: tuple[str, ...] | None = None
    dtype: str | None = None
    # Everything else in config.json, kept verbatim for the round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Types and ranges first, field by field (FIELD_RULES), so that a string where a list belongs is
        # reported as such instead of being split into characters below.
        _check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, FIELD_RULES)
        for name, rules in (("rope_parameters", ROPE_RULES), ("rope_scaling", ROPE_RULES),
                            ("quantization_config", QUANT_RULES)):
            if getattr(self, name) is not None:
                _check_fields(getattr(self, name), rules, name + ".")
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"extra: expected a mapping, got {type(self.extra).__name__}")
        for name in ("rope_parameters", "rope_scaling", "quantization_config", "extra"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(v)))
        for name in ("indexer_types", "mlp_layer_types", "layer_types", "architectures"):
            object.__setattr__(self, name, _tuple_or_none(getattr(self, name)))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.index_topk_pattern, list):
            object.__setattr__(self, "index_topk_pattern", tuple(self.index_topk_pattern))
        self._validate()

    # ------------------------------------------------------------------ derived values

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one latent KV row: the normed kv latent plus the shared rope key (576 for GLM-5.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def indexer_schedule(self) -> tuple[str, ...]:
        """Per main layer, "full" (runs its own indexer) or "shared" (reuses the previous full layer's top-k)."""
        if self.indexer_types is not None:
            return self.indexer_types
        pattern = self.index_topk_pattern
        if pattern is not None:
            if isinstance(pattern, str):
                names = {"F": "full", "S": "shared"}
                if set(pattern) - set(names):
                    raise ConfigError(f"index_topk_pattern: {pattern!r} may contain only 'F' and 'S'")
                return tuple(names[c] for c in pattern)
            return tuple(pattern)
        freq = max(self.index_topk_freq if self.index_topk_freq is not None else 1, 1)
        offset = self.index_skip_topk_offset if self.index_skip_topk_offset is not None else 2
        return tuple(
            "full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(self.num_hidden_layers)
        )

    @property
    def mlp_schedule(self) -> tuple[str, ...]:
        """Per main layer, "dense" or "sparse" (MoE)."""
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        return ("dense",) * n_dense + ("sparse",) * (self.num_hidden_layers - n_dense)

    @property
    def num_full_indexer_layers(self) -> int:
        return sum(t == "full" for t in self.indexer_schedule)

    @property
    def rope(self) -> RopeSpec:
        params = dict(self.rope_parameters or self.rope_scaling or {})
        theta = params.get("rope_theta", self.rope_theta)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if theta is None:
            raise ConfigError("rope_parameters.rope_theta: missing (no rope_theta anywhere in the config)")
        if rope_type == "default":
            return RopeSpec("default", float(theta))
        if rope_type != "yarn":
            raise ConfigError(
                f"rope_parameters.rope_type: {rope_type!r} is not supported (glmjax implements 'default' and 'yarn')"
            )
        if "factor" not in params:
            raise ConfigError("rope_parameters.factor: required for yarn rope")
        omax = params.get("original_max_position_embeddings") or self.max_position_embeddings
        return RopeSpec(
            "yarn",
            float(theta),
            factor=float(params["factor"]),
            original_max_position_embeddings=int(omax),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            truncate=bool(params.get("truncate", True)),
        )

    @property
    def fp8(self) -> Fp8Spec | None:
        q = self.quantization_config
        if q is None:
            return None
        if q.get("quant_method") != "fp8":
            raise ConfigError(
                f"quantization_config.quant_method: {q.get('quant_method')!r} is not supported (only block 'fp8')"
            )
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"quantization_config.fmt: {fmt!r} is not supported (only 'e4m3')")
        block = q.get("weight_block_size")
        if block is None or len(block) != 2 or min(block) <= 0:
            raise ConfigError(f"quantization_config.weight_block_size: expected two positive ints, got {block!r}")
        return Fp8Spec("e4m3", (int(block[0]), int(block[1])))

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        def err(field: str, msg: str) -> ConfigError:
            return ConfigError(f"{field}: {msg}")

        # Types and single-field ranges were checked by FIELD_RULES; these checks relate fields.
        if self.model_type != MODEL_TYPE:
            raise err("model_type", f"{self.model_type!r} is not {MODEL_TYPE!r}")
        if self.num_nextn_predict_layers not in (0, 1):
            # GLM-5.x ships one MTP layer and drafts several tokens by reusing it; a stack of distinct MTP
            # layers (DeepSeek-V3's layout) is not in any GLM checkpoint and is not implemented.
            raise err("num_nextn_predict_layers", f"must be 0 or 1, got {self.num_nextn_predict_layers} (multi-step "
                      "drafting reuses the one MTP layer)")
        if self.qk_rope_head_dim % 2:
            raise err("qk_rope_head_dim", f"must be even for interleaved rope, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise err(
                "index_head_dim",
                f"{self.index_head_dim} is smaller than qk_rope_head_dim {self.qk_rope_head_dim}: the indexer "
                "applies rope to its first qk_rope_head_dim dims",
            )
        if self.head_dim is not None and self.head_dim not in (self.qk_rope_head_dim, self.qk_head_dim):
            raise err(
                "head_dim",
                f"{self.head_dim} is neither qk_rope_head_dim ({self.qk_rope_head_dim}) nor "
                f"qk_nope_head_dim + qk_rope_head_dim ({self.qk_head_dim}): the head dims do not add up",
            )
        if self.num_key_value_heads != self.num_attention_heads:
            raise err(
                "num_key_value_heads",
                f"{self.num_key_value_heads} != num_attention_heads {self.num_attention_heads}; MLA expands the "
                "latent into one key/value head per query head",
            )
        if self.hidden_act != "silu":
            raise err("hidden_act", f"{self.hidden_act!r} is not supported (GLM uses 'silu')")
        if self.attention_bias:
            raise err("attention_bias", "biased attention projections are not supported (GLM has none)")
        if self.mlp_bias:
            raise err("mlp_bias", "biased MLP projections are not supported (GLM has none)")

        L = self.num_hidden_layers
        sched = self.indexer_schedule
        src = ("indexer_types" if self.indexer_types is not None
               else "index_topk_pattern" if self.index_topk_pattern is not None else "index_topk_freq")
        if len(sched) != L:
            raise err(src, f"gives {len(sched)} layers, num_hidden_layers is {L}")
        bad = [t for t in sched if t not in ("full", "shared")]
        if bad:
            raise err(src, f"unknown indexer type {bad[0]!r} (expected 'full'/'shared', or F/S in a pattern)")
        if L and sched[0] != "full":
            raise err(src, "layer 0 is 'shared' but a shared layer needs a full indexer layer before it")
        mlp = self.mlp_schedule
        if len(mlp) != L:
            raise err("mlp_layer_types", f"gives {len(mlp)} layers, num_hidden_layers is {L}")
        if any(t not in ("dense", "sparse") for t in mlp):
            raise err("mlp_layer_types", f"entries must be 'dense' or 'sparse', got {sorted(set(mlp))}")
        if "sparse" in mlp or self.num_nextn_predict_layers:
            E = self.n_routed_experts
            if E <= 0 or not 0 < self.num_experts_per_tok <= E:
                raise err("num_experts_per_tok", f"{self.num_experts_per_tok} must be in [1, n_routed_experts={E}]")
            if self.n_group <= 0 or E % self.n_group:
                raise err("n_group", f"{self.n_group} must divide n_routed_experts={E}")
            if not 0 < self.topk_group <= self.n_group:
                raise err("topk_group", f"{self.topk_group} must be in [1, n_group={self.n_group}]")
            if E // self.n_group < 2:
                raise err("n_group", "each expert group needs >= 2 experts (groups are ranked by their top-2 scores)")
            if self.topk_group * (E // self.n_group) < self.num_experts_per_tok:
                raise err("topk_group", "the chosen groups hold fewer experts than num_experts_per_tok")
        self.rope  # noqa: B018  (validates rope fields)
        self.fp8  # noqa: B018  (validates quantization_config)

    # ------------------------------------------------------------------ JSON round trip

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> GlmMoeDsaConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a JSON object of config fields, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type: {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        if "num_experts" in d and "n_routed_experts" not in d:  # transformers' backward-compatible alias
            d["n_routed_experts"] = d["num_experts"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d[k] for k in d if k in names}
        if "dtype" not in known and "torch_dtype" in d:
            known["dtype"] = d["torch_dtype"]
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)  # __post_init__ checks every field against FIELD_RULES

    @classmethod
    def from_json(cls, path: str | Path) -> GlmMoeDsaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        text = read_text(path, ConfigError)  # a missing file, a FIFO or a directory: an error naming it
        try:
            return cls.from_hf_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except ConfigError as e:  # name the file as well as the field
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue  # absent in the source: stay absent
            if isinstance(v, MappingProxyType):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out.update(self.extra)
        return out

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=False) + "\n")

    def replace(self, **changes: Any) -> GlmMoeDsaConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ counting

    def num_parameters(self, *, include_mtp: bool = True) -> int:
        """Parameter count from the shapes alone (embedding and head counted separately unless tied)."""
        D, H = self.hidden_size, self.num_attention_heads
        attn = (
            D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
            + D * self.latent_dim + self.kv_lora_rank
            + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
            + H * self.v_head_dim * D
        )
        indexer = (
            self.q_lora_rank * self.index_n_heads * self.index_head_dim + D * self.index_head_dim
            + 2 * self.index_head_dim + D * self.index_n_heads
        )
        dense = 3 * D * self.intermediate_size
        moe = (
            D * self.n_routed_experts + self.n_routed_experts
            + 3 * self.n_routed_experts * D * self.moe_intermediate_size
            + 3 * D * self.moe_intermediate_size * self.n_shared_experts
        )
        total = 0
        for ind, mlp in zip(self.indexer_schedule, self.mlp_schedule, strict=True):
            total += 2 * D + attn + (indexer if ind == "full" else 0) + (dense if mlp == "dense" else moe)
        if include_mtp:
            total += self.num_nextn_predict_layers * (2 * D + attn + indexer + moe + 3 * D + 2 * D * D)
        total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        return total

    def softmax_scale(self) -> float:
        """Attention softmax scale: qk_head_dim**-0.5, times yarn's mscale(factor, mscale_all_dim)**2."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope
        if rope.rope_type != "default" and rope.mscale_all_dim:
            m = yarn_mscale(rope.factor, rope.mscale_all_dim)
            scale *= m * m
        return scale


# One rule per config field (the coverage is checked below): types, null, ranges. Relations between fields
# (divisibility, schedule lengths, head dims) are GlmMoeDsaConfig._validate's.
_POS, _COUNT, _OPT_COUNT = Rule("int", ge=1), Rule("int", ge=0), Rule("int", optional=True, ge=0)
_FLAG, _STRS = Rule("bool"), Rule("strs", optional=True)
# The base of rope's geometric frequencies: <= 1 gives no rotation spectrum, and yarn divides by log(theta).
_THETA = Rule("float", optional=True, gt=1)
FIELD_RULES: Mapping[str, Rule] = MappingProxyType({
    "vocab_size": _POS, "hidden_size": _POS, "intermediate_size": _POS, "moe_intermediate_size": _POS,
    "num_hidden_layers": Rule("int", ge=1, le=MAX_LAYERS), "num_attention_heads": _POS,
    "num_key_value_heads": _POS, "n_shared_experts": _COUNT, "n_routed_experts": _POS,
    "routed_scaling_factor": Rule("float", gt=0), "kv_lora_rank": _POS, "q_lora_rank": _POS,
    "qk_rope_head_dim": _POS, "v_head_dim": _POS, "qk_nope_head_dim": _POS, "n_group": _POS, "topk_group": _POS,
    "num_experts_per_tok": _POS, "norm_topk_prob": _FLAG, "hidden_act": Rule("str"),
    "max_position_embeddings": _POS, "initializer_range": Rule("float", ge=0), "rms_norm_eps": Rule("float", gt=0),
    "pad_token_id": _OPT_COUNT, "bos_token_id": _OPT_COUNT, "eos_token_id": Rule("int|ints", optional=True, ge=0),
    "tie_word_embeddings": _FLAG, "attention_bias": _FLAG, "attention_dropout": Rule("float", ge=0, lt=1),
    "index_topk": _POS, "index_head_dim": _POS, "index_n_heads": _POS, "mlp_bias": _FLAG,
    "head_dim": Rule("int", optional=True, ge=1), "first_k_dense_replace": _COUNT, "indexer_types": _STRS,
    "index_topk_pattern": Rule("str|strs", optional=True), "index_topk_freq": _OPT_COUNT,
    "index_skip_topk_offset": _OPT_COUNT, "mlp_layer_types": _STRS, "layer_types": _STRS,
    "rope_parameters": Rule("object", optional=True), "rope_theta": _THETA,
    "rope_scaling": Rule("object", optional=True), "num_nextn_predict_layers": _COUNT,
    "quantization_config": Rule("object", optional=True), "model_type": Rule("str"), "architectures": _STRS,
    "dtype": Rule("str", optional=True),
})
# Keys of rope_parameters / rope_scaling that glmjax reads (others are kept, unread).
ROPE_RULES: Mapping[str, Rule] = MappingProxyType({
    "rope_type": Rule("str"), "type": Rule("str"), "rope_theta": _THETA,
    "factor": Rule("float", gt=0), "original_max_position_embeddings": Rule("int", optional=True, ge=1),
    "attention_factor": Rule("float", optional=True, gt=0), "mscale": Rule("float", optional=True),
    "mscale_all_dim": Rule("float", optional=True),
    # 0 or null means the default (32 / 1), as in transformers.
    "beta_fast": Rule("float", optional=True, ge=0), "beta_slow": Rule("float", optional=True, ge=0),
    "truncate": Rule("bool", optional=True),
})
QUANT_RULES: Mapping[str, Rule] = MappingProxyType({
    "quant_method": Rule("str"), "fmt": Rule("str"), "weight_block_size": Rule("ints", ge=1),
    "activation_scheme": Rule("str", optional=True),
})
_unruled = ({f.name for f in dataclasses.fields(GlmMoeDsaConfig)} - {"extra"}) ^ set(FIELD_RULES)
if _unruled:  # a new field must say what it accepts
    raise AssertionError(f"config fields without a Rule (or Rules without a field): {sorted(_unruled)}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def load_config(path: str | Path) -> GlmMoeDsaConfig:
    """Reads a config.json file, or the config.json inside a checkpoint directory."""
    return GlmMoeDsaConfig.from_json(path)
