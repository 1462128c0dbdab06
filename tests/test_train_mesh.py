"""Training on 8 CPU devices under a mesh with context and expert axes gives the single-device losses and
updates: the same tiny run (float32; stage sparse: LM + 2 MTP steps + the MTP acceptance (TV) loss + the DSA
indexer's KL + the balance loss; AdamW with clipping; the aux-loss-free router bias update) once on one
device and once on context 2 x expert 2 x tensor 2 (the TV loss pairs each draft with the target's
distribution rows later, across the context shards' boundaries)."""

import json

import numpy as np
from flax import nnx

from glmjax.sharding import MODEL_VARIABLES
from tests.conftest import three_layer_indexshare_config
from tests.test_train import tiny_config

STEPS = 3
# On the 3-layer IndexShare config (dense layer with a full indexer, MoE sharing its top-k, MoE with its own
# indexer, MTP; 16 experts, top-4 of 4 groups; 4 heads, 16 indexer heads, hidden 32, vocab 160), 32-token
# sequences and a batch of 4, every axis splits real work: context 2 the sequence (4 load-balanced chunks
# of 8), expert 2 x tensor 2 the 16 routed experts (4 per device, served by the MoE's all_to_all exchange),
# expert 2 the batch, tensor 2 the heads, indexer heads and vocabulary; the parameters are FSDP-split over
# context x expert.
MESH = {"context": 2, "expert": 2, "tensor": 2}
TERMS = ("train/loss", "train/lm_loss", "train/mtp_loss/1", "train/mtp_loss/2", "train/indexer_kl",
         "train/balance_loss", "train/mtp_accuracy/1", "train/mtp_accuracy/2", "train/mtp_expected_accepted",
         "train/grad_norm")
# AdamW's eps. Its first update is lr * g / (|g| + eps): for the gradient entries that are nearly zero
# (~1e-8 where the tensor's largest is ~1e-2), float32 summation-order noise of ~1e-9 (both runs agree to
# ~5e-7 of each tensor's scale) moves the update by up to lr * 1e-9 / eps, 1e-3 with the default 1e-8 (seen:
# 7e-5) and 1e-5 with 1e-6. The sharded computation is what is tested, not that ill-conditioned map.
EPS = 1e-6


def flat(state):
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def train_and_keep_state(cfg):
    """tests.test_train.train that also returns the model's variables (parameters and router biases) and the
    optimizer's state (AdamW moments, the recorded gradient norm, counts) after the last step, by path."""
    from glmjax.train.trainer import Trainer

    trainer = Trainer(cfg, log=lambda *a: None)
    try:
        trainer.fit()
        model, opt = flat(nnx.state(trainer.model, MODEL_VARIABLES)), flat(nnx.state(trainer.optimizer))
        mesh = {a: n for a, n in trainer.mesh.shape.items() if n > 1}
    finally:
        trainer.close()
    records = [json.loads(line) for line in open(f"{cfg.run.output_dir}/metrics.jsonl")]
    return records, model, opt, mesh


def run(tmp_path, mesh):
    tmp_path.mkdir(parents=True)
    three_layer_indexshare_config().to_json(tmp_path / "config.json")
    sets = {"model.config": str(tmp_path / "config.json"), "optimizer.eps": EPS, "run.steps": STEPS,
            "loss.mtp_tv_weight": 0.5,
            "checkpoint.save_every": 1000, **{f"mesh.{a}": n for a, n in mesh.items()}}
    return train_and_keep_state(tiny_config(tmp_path, **sets))


def test_mesh_training_matches_one_device(tmp_path):
    one, one_model, one_opt, one_mesh = run(tmp_path / "one", {})
    sharded, model, opt, mesh = run(tmp_path / "mesh", MESH)
    assert one_mesh == {} and mesh == MESH

    # Every logged term of every step. Seen: <= 6e-7 relative (float32 sums in another order: over devices,
    # sequence chunks, exchange rounds).
    assert [r["step"] for r in sharded] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for want, got in zip(one, sharded, strict=True):
        for k in TERMS:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=f"step {want['step']}: {k}")
        assert got["train/tokens"] == want["train/tokens"]
        # Expert loads are counts: the same routing of every token gives the same per-layer imbalance.
        moe = sorted(k for k in want if k.startswith("moe/"))
        assert moe and [got[k] for k in moe] == [want[k] for k in moe], want["step"]

    # The router biases after 4 aux-loss-free updates (+-rate * sign of each expert's load against the mean):
    # the loads agree exactly, so the biases do too.
    biases = [k for k in one_model if k.endswith("e_score_correction_bias")]
    assert len(biases) == 3 and all(np.any(one_model[k] != 0) for k in biases)
    for k in biases:
        np.testing.assert_array_equal(model[k], one_model[k], err_msg=k)

    # The parameters after 4 AdamW steps (peak lr 1e-2, so a wrong update is off by ~1e-2). Seen: 1.0e-5.
    assert model.keys() == one_model.keys()
    for k, want in one_model.items():
        assert model[k].dtype == want.dtype, k
        np.testing.assert_allclose(model[k], want, rtol=0, atol=1e-4, err_msg=k)

    # AdamW's moments: mu, nu are running means of the clipped gradient and its square, so they check the
    # gradients' values, which the parameters (Adam is nearly invariant to a gradient's scale) would not.
    # Relative to each tensor's largest entry; seen: 1.4e-5.
    assert opt.keys() == one_opt.keys()
    moments = [k for k in one_opt if "/mu/" in k or "/nu/" in k]
    assert len(moments) == 2 * sum(1 for k in one_model if k not in biases)
    for k, want in one_opt.items():
        if want.dtype.kind != "f":  # step counts
            np.testing.assert_array_equal(opt[k], want, err_msg=k)
        else:
            np.testing.assert_allclose(opt[k], want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=k)
