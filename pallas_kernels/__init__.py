"""DSA kernels, one folder per op: a pure-JAX reference beside each accelerator kernel, and a dispatcher.

- `dsa_indexer`: lightning-indexer scores and the exact per-query top-k of them.
- `sparse_mla`: absorbed-MLA attention of each query over only its selected latent rows.
"""
