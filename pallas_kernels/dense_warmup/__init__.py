"""The DSA dense warm-up's two ops, blockwise over queries and keys so that they run at 128K tokens:

- `dense_mla`: causal MLA attention over every allowed key (forward only: the warm-up freezes the model);
- `dense_indexer_kl`: the indexer's KL to that attention's distribution over every allowed key, with its
  gradient to the indexer's queries, keys and head weights.

Pure JAX on every backend (no Pallas kernel): the warm-up is a short stage (about 1,000 steps), and the
sparse stage's kernels cannot serve it, since they take [T, K] selected indices and K = S would be the
[T, S] array this folder exists to avoid.
"""

from pallas_kernels.dense_warmup.attention import dense_mla
from pallas_kernels.dense_warmup.indexer_kl import dense_indexer_kl

__all__ = ["dense_mla", "dense_indexer_kl"]
