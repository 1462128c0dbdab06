import json
import math

import pytest

from glmjax.config import ConfigError, GlmMoeDsaConfig, load_config
from tests.conftest import GOLDEN, REPO

CONFIGS = REPO / "configs"


def test_glm52_schedule_and_size():
    cfg = load_config(CONFIGS / "glm-5.2.json")
    full = [i for i, t in enumerate(cfg.indexer_schedule) if t == "full"]
    assert full == [0, 1, 2] + list(range(6, 75, 4))
    assert cfg.num_full_indexer_layers == 21
    assert cfg.mlp_schedule == ("dense",) * 3 + ("sparse",) * 75
    assert cfg.qk_head_dim == 256 and cfg.latent_dim == 576
    n = cfg.num_parameters()
    without = cfg.num_parameters(include_mtp=False)
    print(f"GLM-5.2 parameters from config: {n / 1e9:.2f}B (with MTP), {without / 1e9:.2f}B without")
    assert round(n / 1e9, 1) == 753.3


def test_glm5_every_layer_full():
    cfg = load_config(CONFIGS / "glm-5.json")
    assert set(cfg.indexer_schedule) == {"full"} and len(cfg.indexer_schedule) == 78


@pytest.mark.parametrize("name", ["glm-5.2", "glm-5", "tiny-demo"])
def test_round_trip(name, tmp_path):
    original = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = GlmMoeDsaConfig.from_hf_dict(original)
    written = cfg.to_hf_dict()
    assert {k: written[k] for k in original} == original
    cfg.to_json(tmp_path / "config.json")
    assert load_config(tmp_path) == cfg


@pytest.mark.parametrize("fixture", ["bf16", "allfull_nomtp"])
def test_schedule_derivation_matches_transformers(fixture):
    # These configs were written by transformers 5.23 with the lists it derived; derive them again ourselves.
    d = json.loads((GOLDEN / fixture / "config.json").read_text())
    hf_indexer, hf_mlp = tuple(d.pop("indexer_types")), tuple(d.pop("mlp_layer_types"))
    cfg = GlmMoeDsaConfig.from_hf_dict(d)
    assert cfg.indexer_schedule == hf_indexer
    assert cfg.mlp_schedule == hf_mlp


@pytest.mark.parametrize(
    "freq,offset,L,expected",
    [
        (4, 3, 10, "FFFSSSFSSS"),
        (3, 2, 7, "FFSSFSS"),
        (1, 2, 4, "FFFF"),
        (2, 0, 5, "SFSFS"),  # layer 0 would be shared: rejected
    ],
)
def test_freq_offset_formula(freq, offset, L, expected):
    base = json.loads((CONFIGS / "tiny-demo.json").read_text())
    base.update(num_hidden_layers=L, index_topk_freq=freq, index_skip_topk_offset=offset)
    want = tuple({"F": "full", "S": "shared"}[c] for c in expected)
    if want[0] != "full":
        with pytest.raises(ConfigError, match="index_topk_freq"):
            GlmMoeDsaConfig.from_hf_dict(base)
        return
    assert GlmMoeDsaConfig.from_hf_dict(base).indexer_schedule == want


def test_pattern_and_explicit_types_override_freq():
    base = json.loads((CONFIGS / "tiny-demo.json").read_text())
    base.update(num_hidden_layers=4, index_topk_pattern="FSFF")
    assert GlmMoeDsaConfig.from_hf_dict(base).indexer_schedule == ("full", "shared", "full", "full")
    base["indexer_types"] = ["full", "full", "shared", "shared"]
    assert GlmMoeDsaConfig.from_hf_dict(base).indexer_schedule == ("full", "full", "shared", "shared")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"index_topk_pattern": "SFFFFF"}, "index_topk_pattern"),
        ({"indexer_types": ["shared"] + ["full"] * 5}, "indexer_types"),
        ({"index_topk_pattern": "FFF"}, "index_topk_pattern"),
        ({"index_topk_pattern": "FXFFFF"}, "index_topk_pattern"),
        ({"head_dim": 40}, "head_dim"),
        ({"index_head_dim": 4}, "index_head_dim"),
        ({"model_type": "deepseek_v32"}, "model_type"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "factor"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}, "weight_block_size"),
        ({"n_group": 3}, "n_group"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"mlp_layer_types": ["dense"] * 5}, "mlp_layer_types"),
    ],
)
def test_validation_names_the_field(change, field):
    base = json.loads((CONFIGS / "tiny-demo.json").read_text())
    base.update(change)
    with pytest.raises(ConfigError) as e:
        GlmMoeDsaConfig.from_hf_dict(base)
    assert field in str(e.value)


def test_yarn_rope_and_softmax_scale():
    d = json.loads((GOLDEN / "indexshare_freq" / "config.json").read_text())
    cfg = GlmMoeDsaConfig.from_hf_dict(d)
    rope = cfg.rope
    assert rope.rope_type == "yarn" and rope.factor == 4 and rope.original_max_position_embeddings == 32
    m = 0.1 * math.log(4) + 1
    assert cfg.softmax_scale() == pytest.approx(cfg.qk_head_dim**-0.5 * m * m)


def test_unknown_fields_survive_round_trip():
    base = json.loads((CONFIGS / "tiny-demo.json").read_text())
    base["some_future_field"] = {"a": [1, 2]}
    cfg = GlmMoeDsaConfig.from_hf_dict(base)
    assert cfg.to_hf_dict()["some_future_field"] == {"a": [1, 2]}
