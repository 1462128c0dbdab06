"""Checks of the arguments of the model's public entry points (`GlmMoeDsa.backbone` and `__call__`) and of
the decoders' prompts. Errors are `InputError`s naming the argument.

Ranks, shapes and dtypes are static, so they are checked whenever a call is traced, jitted or eager.
Values are checked only where they are concrete: in eager calls, and for arrays a jitted function closes
over (constants of the program). The arguments of a jitted function are tracers, and reading them would
need a device sync in the middle of the program. A jitted caller validates its own token ids
(`check_token_ids` on the host array); unchecked, an id >= vocab_size (or < -vocab_size) embeds as a row of
NaN (`jnp.take` fills out-of-range rows) and a negative id counts from the end of the vocabulary, as numpy
indexing does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.config import GlmMoeDsaConfig
from glmjax.errors import InputError


def _shape_dtype(name: str, x) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise InputError(f"{name}: expected an array [B, T], got {type(x).__name__}")
    return tuple(shape), np.dtype(dtype)


def _integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def check_token_ids(ids, vocab_size: int, name: str = "input_ids") -> None:
    """Token ids (any shape) must lie in [0, vocab_size). No-op on tracers (see the module docstring)."""
    if isinstance(ids, jax.core.Tracer) or not np.size(ids):
        return
    # Concrete ids can still meet an active trace (a jitted function closing over them): evaluate right away.
    with jax.ensure_compile_time_eval():
        lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name}: token id {bad} is out of range: ids must be in [0, vocab_size={vocab_size})")


def check_inputs(config: GlmMoeDsaConfig, input_ids, attention_mask=None, positions=None, segment_ids=None) -> None:
    """input_ids [B, T] integer, B and T >= 1; attention_mask [B, T] bool or integer; positions and
    segment_ids [B, T] integer. Token ids are range-checked in eager calls only."""
    shape, dtype = _shape_dtype("input_ids", input_ids)
    if len(shape) != 2:
        raise InputError(f"input_ids: expected rank 2 [B, T], got shape {list(shape)}")
    if min(shape) < 1:
        raise InputError(f"input_ids: empty batch or sequence (shape {list(shape)}); B and T must be >= 1")
    if not _integer(dtype):
        raise InputError(f"input_ids: expected an integer dtype, got {dtype.name}")
    for name, x, kinds in (("attention_mask", attention_mask, "bool or integer"),
                           ("positions", positions, "integer"), ("segment_ids", segment_ids, "integer")):
        if x is None:
            continue
        s, d = _shape_dtype(name, x)
        if s != shape:
            raise InputError(f"{name}: shape {list(s)} differs from input_ids' {list(shape)}")
        if not (_integer(d) or (d == np.bool_ and name == "attention_mask")):
            raise InputError(f"{name}: expected {kinds} dtype, got {d.name}")
    check_token_ids(input_ids, config.vocab_size)


def check_prompts(config: GlmMoeDsaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Prompts for a decoder: at least one, each a non-empty list of token ids in [0, vocab_size); and
    max_new_tokens >= 0 with the longest prompt plus max_new_tokens within max_position_embeddings (the
    decoders allocate buffers of that length, so the number must be checked before it is used)."""
    if not isinstance(max_new_tokens, int | np.integer) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts: expected a non-empty list of prompts (lists of token ids)")
    for i, p in enumerate(prompts):
        if isinstance(p, str | bytes) or not isinstance(p, Sequence | np.ndarray) or len(p) == 0:
            raise InputError(f"prompts[{i}]: every prompt needs at least one token id (a list of ints)")
        for j, t in enumerate(p):
            if not isinstance(t, int | np.integer) or isinstance(t, bool):
                raise InputError(f"prompts[{i}][{j}]: expected an integer token id, got {type(t).__name__} {t!r}")
            if not 0 <= t < config.vocab_size:
                raise InputError(f"prompts[{i}][{j}]: token id {t} is out of range: ids must be in "
                                 f"[0, vocab_size={config.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise InputError(f"max_new_tokens: the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens "
                         f"exceeds max_position_embeddings={config.max_position_embeddings}")
