"""Greedy decoding by full recomputation: no KV cache, one jitted forward over a fixed-length buffer.

Quadratic in length and meant as a reference: the KV-cache decoder and the speculative loop must produce
exactly these tokens. Prompts are right-aligned (left-padded) into one [B, prompt_len + max_new_tokens]
buffer, so one compilation serves every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.model import GlmMoeDsa
from glmjax.model.inputs import check_prompts


def greedy_decode_reference(model: GlmMoeDsa, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                            eos_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations (without the prompt) of each prompt; a row stops after its first EOS token.
    Prompts and max_new_tokens are checked first (InputError), ids against the vocabulary included: the
    forward below is jitted and cannot check values itself."""
    check_prompts(model.config, prompts, max_new_tokens)
    B, P = len(prompts), max(len(p) for p in prompts)
    L = P + max_new_tokens
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):P] = p
        mask[b, P - len(p):P] = 1

    @nnx.jit
    def next_token(model, ids, mask, cur):
        logits = model(ids, mask).logits  # future slots are masked out as keys; causal anyway
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, cur - 1, axis=1, keepdims=False), -1)

    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for step in range(max_new_tokens):
        cur = P + step
        tok = np.asarray(next_token(model, jnp.asarray(ids), jnp.asarray(mask), cur))
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
                done[b] = int(tok[b]) in eos_token_ids
        ids[:, cur], mask[:, cur] = tok, 1
        if done.all():
            break
    return out
