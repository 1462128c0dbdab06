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
