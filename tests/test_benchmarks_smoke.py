"""The benchmark scripts run (CPU path: small shapes, kernels interpreted) and print their comparisons."""

from benchmarks import bench_indexer, bench_sparse_mla


def test_bench_indexer_runs(capsys):
    bench_indexer.main([])
    out = capsys.readouterr().out
    assert "vs reference" in out and "vs lax.top_k" in out


def test_bench_sparse_mla_runs(capsys):
    bench_sparse_mla.main([])
    out = capsys.readouterr().out
    assert out.count("vs reference") == 2


def test_bench_train_glmjax_side_runs(tmp_path):
    """bench_train's glmjax half (the trainer's step on a checkpoint, as the benchmark builds it), on a 2-layer
    cut of its config written by glmjax itself; the transformers half needs its own environment."""
    import numpy as np
    from flax import nnx

    import glmjax
    from benchmarks import bench_train

    cfg = glmjax.GlmMoeDsaConfig.from_hf_dict(dict(bench_train.TRAIN_CONFIG, model_type="glm_moe_dsa",
                                                   num_hidden_layers=2, num_nextn_predict_layers=0))
    glmjax.save_pretrained(glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    batches = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 1, 96)).astype(np.int32)
    out = bench_train.glmjax_train(tmp_path / "ckpt", batches)
    assert len(out["times"]) == len(out["losses"]) == 2
    assert all(abs(loss - np.log(cfg.vocab_size)) < 0.5 for loss in out["losses"]), out["losses"]
    assert all(n > 0 for n in out["grad_norms"])


def test_bench_moe_cpu_runs(capsys):
    from benchmarks import bench_moe_cpu

    bench_moe_cpu.main(["--tokens", "1,128", "--iters", "1"])
    out = capsys.readouterr().out
    assert out.count("the MoE takes dense") == out.count("the MoE takes loop") == 3, out
