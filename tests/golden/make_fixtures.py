"""Golden-fixture generator for glmjax (reference: Hugging Face transformers' `glm_moe_dsa`).

NOT part of glmjax and never imported by it (glmjax has no torch). It needs a separate environment with
the pinned packages in `tests/golden/requirements.txt` (torch 2.13.0 CPU, transformers 5.23.0):

    python -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install -r tests/golden/requirements.txt
    /tmp/hfenv/bin/python tests/golden/make_fixtures.py            # all fixtures
    /tmp/hfenv/bin/python tests/golden/make_fixtures.py fp8 bf16   # only some

It runs from any working directory and rewrites, for each fixture NAME, next to this file:

* `NAME/`: a Hugging Face checkpoint directory (`config.json`, `model.safetensors` or sharded
  `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`, and whatever `save_pretrained` writes,
  e.g. `generation_config.json`). Experts are stored in the hub's per-expert layout
  (`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`). An MTP layer, when the fixture has one,
  is stored as layer `L = num_hidden_layers` (`model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.norm}` plus a
  full decoder layer's keys), and config.json gets `num_nextn_predict_layers`.
* `NAME.npz`: the golden data, all produced by transformers' eager implementation:
    - `input_ids`, `attention_mask` (1 = real token), `position_ids`: int32 [B, T], exactly what was
      passed to HF;
    - `logits` float32 [B, T, V]; `hidden` float32 [B, T, D] (`GlmMoeDsaModel(...).last_hidden_state`, i.e.
      after the final norm);
    - `mtp_logits` float32 [B, T-1, V] (only with an MTP layer; row j predicts token j+2):
      `x_j = eh_proj(cat[enorm(embed(ids[:, j+1])), hnorm(hidden[:, j])])`, decoder layer L on x[:, :T-1] with
      position_ids[:, :T-1], attention_mask[:, :T-1] (mask from transformers' `create_causal_mask`), rope
      from the main model's `rotary_emb`, then `shared_head.norm`, then the main `lm_head`;
    - `topk_layer{i}` int32 [B, T, min(index_topk, T)] for each "full" (indexer-running) layer i of the main
      model, and `topk_mtp` int32 [B, T-1, k] for the MTP layer's own indexer: the indexer's top-k output
      (descending score order). Debugging aid only: on padding query rows, and where fewer than k keys are
      visible, the tail entries point at masked keys whose scores tie and are meaningless;
    - `dtype`: 0-d string array, "float32" or "bfloat16": the dtype HF ran in (outputs are stored as float32).
  Rows where attention_mask == 0 (left padding) are garbage in HF (a fully masked query row attends uniformly
  to all keys); compare only real-token rows.

Fixtures:
  indexshare_freq     fp32, 7 layers, index_topk_freq 3 / index_skip_topk_offset 2, yarn rope, grouped
                      routing, left-padded batch, MTP, sharded checkpoint (>= 3 shards + index json).
  indexshare_pattern  fp32, 8 layers, explicit index_topk_pattern, default rope, no padding, single file, MTP.
  fp8                 FP8 (e4m3, 128x128 block scales) checkpoint written by hand, hidden 160 (partial
                      blocks), index_topk_pattern "FFS", MTP; HF ran in fp32 on the exactly dequantized
                      weights (non-quantized tensors bf16-rounded, stored BF16).
  bf16                indexshare_freq architecture saved in bf16, reloaded with dtype=bfloat16, run in bf16.
  allfull_nomtp       fp32, every layer full, no MTP, left-padded batch.

For the freq/pattern/fp8 fixtures the derived lists `indexer_types`, `mlp_layer_types` and `layer_types` are
removed from config.json (like the hub's config.json), so a loader must derive the IndexShare schedule from
`index_topk_freq`/`index_skip_topk_offset` or `index_topk_pattern`, and the dense/MoE split from
`first_k_dense_replace`. bf16 and allfull_nomtp keep what save_pretrained wrote (with `indexer_types`).

Every fixture asserts that DSA sparsity matters (raising index_topk to >= T changes real-token logits by
> 1e-3) and, except fp8, that `GlmMoeDsaForCausalLM.from_pretrained` on the saved directory reproduces the
recorded logits. Deterministic: fixed seeds, CPU only.
"""

import copy
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import (
    GlmMoeDsaDecoderLayer,
    GlmMoeDsaExperts,
    GlmMoeDsaRMSNorm,
    GlmMoeDsaTopkRouter,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FP8_BLOCK = 128
FP8_MAX = 448.0
DERIVED_KEYS = ("indexer_types", "mlp_layer_types", "layer_types")

# Shared small architecture pieces (hidden 32).
_SMALL = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    v_head_dim=8,
    intermediate_size=64,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    tie_word_embeddings=False,
)

_FREQ_CFG = dict(
    _SMALL,
    vocab_size=160,
    num_hidden_layers=7,
    qk_rope_head_dim=16,
    index_n_heads=16,
    index_head_dim=24,
    index_topk=8,
    index_topk_freq=3,
    index_skip_topk_offset=2,
    first_k_dense_replace=2,
    moe_intermediate_size=8,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    max_position_embeddings=128,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=32,
        mscale=1.0,
        mscale_all_dim=1.0,
        beta_fast=32.0,
        beta_slow=1.0,
    ),
)

FIXTURES = {
    "indexshare_freq": dict(
        seed=1234,
        cfg=_FREQ_CFG,
        expect_indexer=["full", "full", "shared", "shared", "full", "shared", "shared"],
        T=48,
        pads=[7, 0],
        mtp=True,
        save="sharded",
        strip_derived=True,
    ),
    "indexshare_pattern": dict(
        seed=2345,
        cfg=dict(
            _SMALL,
            vocab_size=128,
            num_hidden_layers=8,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            index_n_heads=16,
            index_head_dim=16,
            index_topk=12,
            index_topk_pattern="FSSFFSFS",
            first_k_dense_replace=1,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            max_position_embeddings=256,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        expect_indexer=["full", "shared", "shared", "full", "full", "shared", "full", "shared"],
        T=48,
        pads=[0, 0],
        mtp=True,
        save="single",
        strip_derived=True,
    ),
    "fp8": dict(
        seed=3456,
        cfg=dict(
            vocab_size=128,
            hidden_size=160,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=136,
            kv_lora_rank=120,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=48,
            intermediate_size=200,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            index_n_heads=16,
            index_head_dim=32,
            index_topk=8,
            index_topk_pattern="FFS",
            first_k_dense_replace=1,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            initializer_range=0.06,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        expect_indexer=["full", "full", "shared"],
        T=40,
        pads=[0, 5],
        mtp=True,
        save="fp8",
        strip_derived=True,
    ),
    "bf16": dict(
        seed=4567,
        cfg=_FREQ_CFG,
        expect_indexer=["full", "full", "shared", "shared", "full", "shared", "shared"],
        T=48,
        pads=[7, 0],
        mtp=True,
        save="bf16",
        strip_derived=False,
    ),
    "allfull_nomtp": dict(
        seed=5678,
        cfg=dict(
            _SMALL,
            vocab_size=128,
            num_hidden_layers=4,
            qk_rope_head_dim=8,
            index_n_heads=16,
            index_head_dim=16,
            index_topk=16,
            first_k_dense_replace=1,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            max_position_embeddings=256,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        expect_indexer=["full", "full", "full", "full"],
        T=64,
        pads=[0, 11],
        mtp=False,
        save="single",
        strip_derived=False,
    ),
}


# ----------------------------------------------------------------------------------------------------
# model construction


def randomize_trivial(module, std):
    """Give non-trivial values to everything that defaults to ones/zeros (norms, k_norm, correction bias)."""
    for m in module.modules():
        if isinstance(m, GlmMoeDsaRMSNorm):
            m.weight.data = 1.0 + 0.3 * torch.randn_like(m.weight)
        elif isinstance(m, nn.LayerNorm):
            m.weight.data = 1.0 + 0.3 * torch.randn_like(m.weight)
            m.bias.data = 0.3 * torch.randn_like(m.bias)
        elif isinstance(m, GlmMoeDsaTopkRouter):
            m.e_score_correction_bias.data = 0.1 * torch.randn_like(m.e_score_correction_bias)


def init_like_hf(module, std):
    """Initialize a module outside a PreTrainedModel (the MTP layer) the way HF's _init_weights would."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, GlmMoeDsaExperts):
            nn.init.normal_(m.gate_up_proj, 0.0, std)
            nn.init.normal_(m.down_proj, 0.0, std)
        elif isinstance(m, GlmMoeDsaTopkRouter):
            nn.init.normal_(m.weight, 0.0, std)
    randomize_trivial(module, std)


def build_model(fx):
    torch.manual_seed(fx["seed"])
    cfg = GlmMoeDsaConfig(**fx["cfg"])
    cfg._attn_implementation = "eager"
    assert cfg.indexer_types == fx["expect_indexer"], (cfg.indexer_types, fx["expect_indexer"])
    model = GlmMoeDsaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "eager"
    randomize_trivial(model, cfg.initializer_range)
    return model


def build_mtp(model):
    """The MTP layer from transformers' own pieces, stored as layer L = num_hidden_layers."""
    cfg = model.config
    L = cfg.num_hidden_layers
    cfg_ext = copy.deepcopy(cfg)
    cfg_ext.indexer_types = list(cfg.indexer_types) + ["full"]
    cfg_ext.mlp_layer_types = list(cfg.mlp_layer_types) + ["sparse"]
    cfg_ext._attn_implementation = "eager"
    layer = GlmMoeDsaDecoderLayer(cfg_ext, layer_idx=L)
    D = cfg.hidden_size
    layer.enorm = GlmMoeDsaRMSNorm(D, eps=cfg.rms_norm_eps)
    layer.hnorm = GlmMoeDsaRMSNorm(D, eps=cfg.rms_norm_eps)
    layer.eh_proj = nn.Linear(2 * D, D, bias=False)
    layer.shared_head = nn.Module()
    layer.shared_head.norm = GlmMoeDsaRMSNorm(D, eps=cfg.rms_norm_eps)
    init_like_hf(layer, cfg.initializer_range)
    return layer.eval()


def per_expert_state_dict(module, prefix=""):
    """state_dict with fused experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]) split to hub layout."""
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{base}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{prefix}{base}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[prefix + k] = v.contiguous()
    return out


# ----------------------------------------------------------------------------------------------------
# running


def make_inputs(fx, vocab):
    g = torch.Generator().manual_seed(fx["seed"] + 1)
    B, T = len(fx["pads"]), fx["T"]
    ids = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(fx["pads"]):
        mask[b, :p] = 0
        ids[b, :p] = 0  # pad token id 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def indexers(model, mtp=None):
    out = [
        (i, lyr.self_attn.indexer)
        for i, lyr in enumerate(model.model.layers)
        if lyr.self_attn.indexer is not None
    ]
    if mtp is not None:
        out.append(("mtp", mtp.self_attn.indexer))
    return out


@torch.no_grad()
def run_main(model, ids, mask, pos, record_topk=False):
    store, hooks = {}, []
    if record_topk:
        for i, ix in indexers(model):
            hooks.append(ix.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o.clone())))
    try:
        base = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden = base.last_hidden_state
    logits = model.lm_head(hidden)
    return logits, hidden, store


@torch.no_grad()
def run_mtp(model, mtp, ids, mask, pos, hidden, record_topk=False):
    T = ids.shape[1]
    emb = model.model.embed_tokens(ids[:, 1:])
    x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(hidden[:, : T - 1])], dim=-1))
    pos_m, mask_m = pos[:, : T - 1], mask[:, : T - 1]
    causal = create_causal_mask(
        config=model.config,
        inputs_embeds=x,
        attention_mask=mask_m,
        past_key_values=None,
        position_ids=pos_m,
        allow_is_causal_skip=False,
    )
    pe = model.model.rotary_emb(x, position_ids=pos_m)
    out, topk = mtp(
        x,
        attention_mask=causal,
        position_embeddings=pe,
        position_ids=pos_m,
        past_key_values=None,
        use_cache=False,
        prev_topk_indices=None,
    )
    out = mtp.shared_head.norm(out)
    return model.lm_head(out), topk


def set_topk(ixs, value):
    old = [ix.index_topk for _, ix in ixs]
    for _, ix in ixs:
        ix.index_topk = value
    return old


def check_sparsity_matters(model, mtp, ids, mask, pos, logits, mtp_logits):
    ixs = indexers(model, mtp)
    old = set_topk(ixs, 10**9)
    try:
        dense_logits, dense_hidden, _ = run_main(model, ids, mask, pos)
        real = mask.bool()
        d = (dense_logits.float() - logits.float())[real].abs().max().item()
        res = {"main": d}
        if mtp is not None:
            dm, _ = run_mtp(model, mtp, ids, mask, pos, dense_hidden)
            realm = mask[:, :-1].bool()
            res["mtp"] = (dm.float() - mtp_logits.float())[realm].abs().max().item()
    finally:
        for (_, ix), v in zip(ixs, old, strict=True):
            ix.index_topk = v
    assert res["main"] > 1e-3, f"DSA sparsity does not matter: {res}"
    return res


# ----------------------------------------------------------------------------------------------------
# checkpoint writing


def check_hub_layout(ckpt_dir, model):
    """Assert save_pretrained wrote per-expert keys equal to the fused parameters; return expert key names."""
    tensors = {}
    for f in sorted(os.listdir(ckpt_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(ckpt_dir, f)))
    assert not [k for k in tensors if "gate_up_proj" in k], "fused expert keys in saved checkpoint"
    expected = per_expert_state_dict(model)
    assert set(tensors) == set(expected), sorted(set(tensors) ^ set(expected))[:20]
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype, (k, tensors[k].dtype, v.dtype)
        assert torch.equal(tensors[k], v), k
    return sorted(k for k in tensors if ".mlp.experts." in k)


def edit_config(ckpt_dir, fx, extra):
    p = os.path.join(ckpt_dir, "config.json")
    with open(p) as f:
        c = json.load(f)
    if fx["strip_derived"]:
        for k in DERIVED_KEYS:
            c.pop(k, None)
    c.update(extra)
    with open(p, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    return c


def add_mtp_tensors(ckpt_dir, mtp_sd):
    """Append MTP tensors: rewrite model.safetensors, or add one more shard and renumber the shard names."""
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        path = os.path.join(ckpt_dir, "model.safetensors")
        sd = load_file(path)
        assert not set(sd) & set(mtp_sd)
        sd.update(mtp_sd)
        save_file(sd, path, metadata={"format": "pt"})
        return
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards) + 1
    rename = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shards)}
    for old, new in rename.items():
        os.rename(os.path.join(ckpt_dir, old), os.path.join(ckpt_dir, new + ".tmp"))
    for new in rename.values():
        os.rename(os.path.join(ckpt_dir, new + ".tmp"), os.path.join(ckpt_dir, new))
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(mtp_sd, os.path.join(ckpt_dir, last), metadata={"format": "pt"})
    wm = {k: rename[v] for k, v in index["weight_map"].items()}
    assert not set(wm) & set(mtp_sd)
    for k in mtp_sd:
        wm[k] = last
    index["weight_map"] = dict(sorted(wm.items()))
    index.setdefault("metadata", {})
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + sum(
        v.numel() * v.element_size() for v in mtp_sd.values()
    )
    if "total_parameters" in index["metadata"]:
        # transformers counts parameters only (not the e_score_correction_bias buffers)
        index["metadata"]["total_parameters"] += sum(
            v.numel() for k, v in mtp_sd.items() if not k.endswith("e_score_correction_bias")
        )
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def quantizable(name):
    """Whether a (per-expert-layout, un-prefixed) 2-D weight name is FP8-quantized in the release."""
    if not name.endswith(".weight"):
        return False
    n = name[: -len(".weight")]
    leaf = n.split(".")[-1]
    if ".self_attn.indexer." in n:
        return leaf in ("wq_b", "wk")
    if ".self_attn." in n:
        return leaf in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    if ".mlp." in n:
        return leaf in ("gate_proj", "up_proj", "down_proj")  # dense, shared_experts and routed experts
    return False


def fp8_quantize(w):
    """128x128 block FP8: (fp8 [O, I], scale_inv f32 [ceil(O/128), ceil(I/128)], dequantized f32)."""
    n_out, n_in = w.shape
    bo, bi = math.ceil(n_out / FP8_BLOCK), math.ceil(n_in / FP8_BLOCK)
    padded = F.pad(w.float(), (0, bi * FP8_BLOCK - n_in, 0, bo * FP8_BLOCK - n_out))
    amax = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK).abs().amax(dim=(1, 3))
    scale_inv = (amax / FP8_MAX).float()
    full = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n_out, :n_in]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    deq = q.float() * full
    return q, scale_inv, deq


def fp8_convert(model, mtp, L):
    """Quantize/dequantize the torch model in place; return the checkpoint dict (hub layout)."""
    ckpt = {}
    for prefix, mod in (("", model), (f"model.layers.{L}.", mtp)):
        sd = per_expert_state_dict(mod, prefix)
        for k, v in sd.items():
            if quantizable(k) and not k.endswith("eh_proj.weight"):
                q, s, _ = fp8_quantize(v)
                ckpt[k] = q
                ckpt[k[: -len("weight")] + "weight_scale_inv"] = s
            else:
                ckpt[k] = v.to(torch.bfloat16)
        # write the exact file values back into the torch module (fp32)
        with torch.no_grad():
            for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                if name.endswith("mlp.experts.gate_up_proj"):
                    base = prefix + name[: -len("gate_up_proj")]
                    inter = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        t[e, :inter] = dequant(ckpt, f"{base}{e}.gate_proj")
                        t[e, inter:] = dequant(ckpt, f"{base}{e}.up_proj")
                elif name.endswith("mlp.experts.down_proj"):
                    base = prefix + name[: -len("down_proj")]
                    for e in range(t.shape[0]):
                        t[e] = dequant(ckpt, f"{base}{e}.down_proj")
                elif prefix + name in ckpt:
                    k = prefix + name
                    if k.endswith(".weight") and k[: -len("weight")] + "weight_scale_inv" in ckpt:
                        t.copy_(dequant(ckpt, k[: -len(".weight")]))
                    else:
                        t.copy_(ckpt[k].float())
                elif "inv_freq" not in name:
                    raise KeyError(name)
    return ckpt


def fused_from_hub(sd, module, prefix):
    """Hub-layout tensors under `prefix` -> a state_dict for `module` (fused experts), all float32."""
    out = {}
    for name, t in module.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = prefix + name[: -len("gate_up_proj")]
            out[name] = torch.stack(
                [
                    torch.cat([sd[f"{base}{e}.gate_proj"], sd[f"{base}{e}.up_proj"]], 0)
                    for e in range(t.shape[0])
                ]
            )
        elif name.endswith("mlp.experts.down_proj"):
            base = prefix + name[: -len("down_proj")]
            out[name] = torch.stack([sd[f"{base}{e}.down_proj"] for e in range(t.shape[0])])
        else:
            out[name] = sd[prefix + name[: -len(".weight")] if name.endswith(".weight") else prefix + name]
    return out


def check_fp8_file(ckpt_dir, fx, ids, mask, pos, logits, mtp_logits):
    """Rebuild an fp32 model from the written FP8 checkpoint + config.json alone and rerun it."""
    cfg = GlmMoeDsaConfig.from_pretrained(ckpt_dir)
    cfg._attn_implementation = "eager"
    assert cfg.indexer_types == fx["expect_indexer"], cfg.indexer_types
    raw = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    sd = {}
    for k, v in raw.items():
        if k.endswith(".weight_scale_inv"):
            continue
        if k.endswith(".weight") and k[: -len("weight")] + "weight_scale_inv" in raw:
            sd[k[: -len(".weight")]] = dequant(raw, k[: -len(".weight")])
        else:
            sd[k[: -len(".weight")] if k.endswith(".weight") else k] = v.float()
    model = GlmMoeDsaForCausalLM(cfg).eval()
    model.load_state_dict(fused_from_hub(sd, model, ""), strict=True)
    L = cfg.num_hidden_layers
    rl, rh, _ = run_main(model, ids, mask, pos)
    res = {"main": (rl - logits).abs().max().item()}
    if mtp_logits is not None:
        mtp = build_mtp(model)
        mtp.load_state_dict(fused_from_hub(sd, mtp, f"model.layers.{L}."), strict=True)
        rm, _ = run_mtp(model, mtp, ids, mask, pos, rh)
        res["mtp"] = (rm - mtp_logits).abs().max().item()
    assert max(res.values()) <= 1e-5, res
    return res


def dequant(ckpt, base):
    q, s = ckpt[base + ".weight"], ckpt[base + ".weight_scale_inv"]
    n_out, n_in = q.shape
    full = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n_out, :n_in]
    return q.float() * full


# ----------------------------------------------------------------------------------------------------


def fixture(name):
    fx = FIXTURES[name]
    print(f"\n=== {name} ===", flush=True)
    ckpt_dir = os.path.join(HERE, name)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.makedirs(ckpt_dir)
    model = build_model(fx)
    cfg = model.config
    L = cfg.num_hidden_layers
    mtp = build_mtp(model) if fx["mtp"] else None
    ids, mask, pos = make_inputs(fx, cfg.vocab_size)
    run_dtype = "float32"
    expert_keys = None
    info = {}

    if fx["save"] in ("sharded", "single"):
        if fx["save"] == "sharded":
            total = sum(v.numel() * v.element_size() for v in per_expert_state_dict(model).values())
            model.save_pretrained(ckpt_dir, max_shard_size=f"{total // 4 // 1000}KB")
        else:
            model.save_pretrained(ckpt_dir)
        expert_keys = check_hub_layout(ckpt_dir, model)
    elif fx["save"] == "bf16":
        # Cast to bf16 but keep e_score_correction_bias in f32 (transformers keeps it f32:
        # _keep_in_fp32_modules_strict).
        biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
        model.to(torch.bfloat16)
        for n, b in model.named_buffers():
            if n in biases:
                b.data = biases[n]
        model.save_pretrained(ckpt_dir, max_shard_size=f"{100}KB")
        expert_keys = check_hub_layout(ckpt_dir, model)
        if mtp is not None:
            mb = mtp.mlp.gate.e_score_correction_bias.clone()
            mtp.to(torch.bfloat16)
            mtp.mlp.gate.e_score_correction_bias.data = mb
        saved_model = model
        model = GlmMoeDsaForCausalLM.from_pretrained(
            ckpt_dir, dtype=torch.bfloat16, attn_implementation="eager"
        ).eval()
        info["reloaded_dtypes"] = {
            "e_score_correction_bias": str(model.model.layers[L - 1].mlp.gate.e_score_correction_bias.dtype),
            "indexer.weights_proj": str(model.model.layers[0].self_attn.indexer.weights_proj.weight.dtype),
            "embed": str(model.model.embed_tokens.weight.dtype),
        }
        # mirror transformers' dtype decisions in the MTP layer
        if mtp is not None:
            mtp.self_attn.indexer.weights_proj.to(
                model.model.layers[0].self_attn.indexer.weights_proj.weight.dtype
            )
        # the reloaded model must hold exactly the in-memory values
        for (n1, t1), (n2, t2) in zip(
            sorted(list(saved_model.state_dict().items())),
            sorted(list(model.state_dict().items())),
            strict=True,
        ):
            assert n1 == n2 and torch.equal(t1.float(), t2.float()), n1
        del saved_model
        run_dtype = "bfloat16"
    elif fx["save"] == "fp8":
        ckpt = fp8_convert(model, mtp, L)
        info["fp8_blocks"] = {
            k[: -len(".weight_scale_inv")]: list(v.shape)
            for k, v in ckpt.items()
            if k.endswith("weight_scale_inv") and k.startswith("model.layers.1.")
        }
        save_file(ckpt, os.path.join(ckpt_dir, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(ckpt_dir)
        expert_keys = sorted(
            k for k in ckpt if ".mlp.experts." in k and not k.startswith(f"model.layers.{L}.")
        )
    else:
        raise ValueError(fx["save"])

    # ---- run
    logits, hidden, topk = run_main(model, ids, mask, pos, record_topk=True)
    full_logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert torch.equal(full_logits, logits)
    if fx["pads"] == [0] * len(fx["pads"]):
        # position_ids default to arange and an all-ones mask is the same as no mask
        l2 = model(input_ids=ids, use_cache=False).logits
        info["no_mask_no_pos_maxdiff"] = (l2 - logits).abs().max().item()
        assert info["no_mask_no_pos_maxdiff"] == 0.0, info
    mtp_logits = mtp_topk = None
    if mtp is not None:
        mtp_logits, mtp_topk = run_mtp(model, mtp, ids, mask, pos, hidden)
    info["sparsity_maxdiff"] = check_sparsity_matters(model, mtp, ids, mask, pos, logits, mtp_logits)

    # ---- checkpoint: MTP tensors + config
    if mtp is not None and fx["save"] != "fp8":
        add_mtp_tensors(ckpt_dir, per_expert_state_dict(mtp, f"model.layers.{L}."))
    extra = {"num_nextn_predict_layers": 1 if mtp is not None else 0}
    if fx["save"] == "fp8":
        extra.update(
            dtype="bfloat16",
            torch_dtype="bfloat16",
            quantization_config={
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                "activation_scheme": "dynamic",
            },
        )
    config_json = edit_config(ckpt_dir, fx, extra)

    # ---- reload check (transformers drops the MTP keys of layer L on load)
    if fx["save"] == "fp8":
        info["fp8_file_rerun_maxdiff"] = check_fp8_file(ckpt_dir, fx, ids, mask, pos, logits, mtp_logits)
    else:
        dt = torch.bfloat16 if run_dtype == "bfloat16" else torch.float32
        re = GlmMoeDsaForCausalLM.from_pretrained(ckpt_dir, dtype=dt, attn_implementation="eager").eval()
        assert re.config.indexer_types == cfg.indexer_types, (re.config.indexer_types, cfg.indexer_types)
        assert re.config.mlp_layer_types == cfg.mlp_layer_types
        rl, rh, _ = run_main(re, ids, mask, pos)
        info["reload_maxdiff"] = (rl.float() - logits.float()).abs().max().item()
        assert info["reload_maxdiff"] <= 1e-5, info
        if mtp is not None:
            rml, _ = run_mtp(re, mtp, ids, mask, pos, rh)
            info["reload_mtp_maxdiff"] = (rml.float() - mtp_logits.float()).abs().max().item()
            assert info["reload_mtp_maxdiff"] <= 1e-5, info
        del re

    # ---- npz
    out = {
        "input_ids": ids.to(torch.int32).numpy(),
        "attention_mask": mask.to(torch.int32).numpy(),
        "position_ids": pos.to(torch.int32).numpy(),
        "logits": logits.float().numpy(),
        "hidden": hidden.float().numpy(),
        "dtype": np.array(run_dtype),
    }
    if mtp is not None:
        out["mtp_logits"] = mtp_logits.float().numpy()
        out["topk_mtp"] = mtp_topk.to(torch.int32).numpy()
    for i, t in topk.items():
        out[f"topk_layer{i}"] = t.to(torch.int32).numpy()
    assert sorted(int(i) for i in topk) == [i for i, t in enumerate(cfg.indexer_types) if t == "full"]
    np.savez_compressed(os.path.join(HERE, f"{name}.npz"), **out)

    real = mask.bool()
    info["logits_std_real"] = logits.float()[real].std().item()
    info["hidden_std_real"] = hidden.float()[real].std().item()
    if mtp is not None:
        info["mtp_logits_std_real"] = mtp_logits.float()[mask[:, :-1].bool()].std().item()
    info["files"] = sorted(os.listdir(ckpt_dir))
    if fx["save"] == "sharded":
        assert sum(f.endswith(".safetensors") for f in info["files"]) >= 3, info["files"]
    for f in info["files"]:
        os.chmod(os.path.join(ckpt_dir, f), 0o644)  # save_pretrained writes shards 0600
    os.chmod(os.path.join(HERE, f"{name}.npz"), 0o644)
    info["n_expert_keys"] = len(expert_keys)
    info["expert_keys_example"] = [
        k for k in expert_keys if k.startswith(f"model.layers.{cfg.first_k_dense_replace}.mlp.experts.0.")
    ]
    info["config"] = {
        k: config_json.get(k)
        for k in sorted(config_json)
        if k not in ("architectures", "transformers_version")
    }
    print(json.dumps(info, indent=1, default=str), flush=True)
    return info


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    assert transformers.__version__ == "5.23.0", transformers.__version__
    names = sys.argv[1:] or list(FIXTURES)
    for n in names:
        fixture(n)


if __name__ == "__main__":
    main()
