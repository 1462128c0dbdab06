"""What a generation request asks for: the sampling parameters and the prompt, checked once at the door.

`SamplingParams` validates itself, so the engine can trust every field; `sampling_params_from_body` reads
them from the body of an OpenAI request (`/v1/completions` or `/v1/chat/completions`, the format of the
batch files `serve.py` runs, as vLLM's `run-batch` reads them). Errors are `InputError`s naming the field:
`max_tokens: ...` from the dataclass, `body.max_tokens: ...` from the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from glmjax.errors import InputError

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MAX_TEMPERATURE = 100.0  # Far beyond any useful value; a bound keeps 1 / temperature finite and meaningful.
_SEED_RANGE = (-(2**63), 2**64)  # int64 or uint64: the seeds OpenAI and vLLM clients send


def is_int(x) -> bool:
    """An integer, as JSON or numpy give them, but not a bool."""
    # bool is an int subclass, but `max_tokens: true` is a mistake, not the number 1.
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def is_number(x) -> bool:
    """An integer or a float (NaN and inf included: range checks catch those), not a bool."""
    return is_int(x) or isinstance(x, float | np.floating)


def fold_seed(seed: int) -> int:
    """A 64-bit seed (signed or unsigned) folded to 32 bits, the engine's PRNG key width: seeds in
    [0, 2**32) are kept as they are, larger ones XOR their high half into the low half (so seeds that differ
    only in the high bits still give different streams, mostly), negative ones count from 2**64."""
    x = seed % 2**64
    return (x ^ (x >> 32)) & 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion (the OpenAI and vLLM names and meanings).

    max_tokens: tokens to generate at most, >= 1 (16 is OpenAI's default for completions).
    temperature: in [0, 100]; 0 = greedy (argmax), and then top_p, top_k and seed have no effect.
    top_p: nucleus sampling, in (0, 1]; 1 = off.
    top_k: >= 1 keeps the k most likely tokens; 0 or -1 = off (-1 is vLLM's spelling, stored as 0).
    seed: None lets the engine pick one. Any 64-bit integer (signed or unsigned, as OpenAI and vLLM accept)
        is taken and stored folded to 32 bits (`fold_seed`): seeds in [0, 2**32) are stored unchanged.
    stop: up to 4 non-empty strings; the output ends before the first one that appears (not included).
    stop_token_ids: generation ends after any of these ids (counted as output, not shown as text).
    ignore_eos: keep generating past the end-of-sequence token (benchmarks; max_tokens still ends it).
    return_token_ids: add the prompt's and the completion's token ids to the response (vLLM's option).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_token_ids: bool = False

    def __post_init__(self):
        # Frozen: normalised values go in through object.__setattr__.
        def put(name, value):
            object.__setattr__(self, name, value)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        put("max_tokens", int(self.max_tokens))

        if not is_number(self.temperature) or not 0.0 <= float(self.temperature) <= MAX_TEMPERATURE:
            # NaN fails the comparison too, so it lands here.
            raise InputError(f"temperature: expected a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        put("temperature", float(self.temperature))

        if not is_number(self.top_p) or not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        put("top_p", float(self.top_p))

        if not is_int(self.top_k) or self.top_k < -1:
            raise InputError(f"top_k: expected an integer >= 1, or 0 or -1 for no limit, got {self.top_k!r}")
        put("top_k", max(int(self.top_k), 0))

        if self.seed is not None:
            if not is_int(self.seed) or not _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]:
                raise InputError(f"seed: expected a 64-bit integer (or null), got {self.seed!r}")
            put("seed", fold_seed(int(self.seed)))

        if isinstance(self.stop, str) or not isinstance(self.stop, tuple | list):
            raise InputError(f"stop: expected a tuple of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InputError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InputError(f"stop[{i}]: expected a non-empty string, got {s!r}")
        put("stop", tuple(self.stop))

        if isinstance(self.stop_token_ids, str) or not isinstance(self.stop_token_ids, tuple | list):
            raise InputError(f"stop_token_ids: expected a tuple of token ids, got {type(self.stop_token_ids).__name__}")
        for i, t in enumerate(self.stop_token_ids):
            if not is_int(t) or t < 0:
                raise InputError(f"stop_token_ids[{i}]: expected a non-negative integer token id, got {t!r}")
        put("stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

        for name in ("ignore_eos", "return_token_ids"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One generation request, ready for the engine.

    id: the batch line's custom_id (unique within the file; the output record carries it back).
    prompt_ids: the prompt's token ids, non-empty, each in [0, vocab_size).
    kind: the endpoint it came from, which decides the shape of the response.
    prompt_text: the prompt as text (the rendered chat template for chat), or None for a token-id prompt.
    model: the body's `model`, echoed in the response (None: the caller names the model).
    """

    id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    kind: Literal["chat", "completion"]
    prompt_text: str | None = None
    model: str | None = None


# What sampling_params_from_body reads. Any other key of the body is ignored, as OpenAI keys this server does
# not implement (frequency_penalty, presence_penalty, logit_bias, logprobs, top_logprobs, user, stream, ...)
# would be by a server that accepts them with defaults.
SAMPLING_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
                 "top_k", "stop_token_ids", "ignore_eos", "return_token_ids")


def sampling_params_from_body(body: Mapping, *, default_max_tokens: int = 16) -> SamplingParams:
    """The SamplingParams of an OpenAI request body.

    Reads the OpenAI names `max_tokens` and `max_completion_tokens` (chat's newer name; either is read on
    both endpoints, and if both are given they must agree), `temperature`, `top_p`, `seed`, `stop` (a
    string or a list of strings) and `n` (only n = 1 is supported: one completion per request line), plus
    vLLM's extras `top_k`, `stop_token_ids`, `ignore_eos` and `return_token_ids`. A key set to null counts as
    absent. Other keys are not read here (see SAMPLING_KEYS). `default_max_tokens` applies when the body
    names no limit (16 for completions as in OpenAI; a chat caller passes the room left in the context).

    Raises InputError naming `body.<field>` for a wrong type or value.
    """
    if not isinstance(body, Mapping):
        raise InputError(f"body: expected a JSON object, got {type(body).__name__}")
    get = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}

    n = get.pop("n", 1)
    if not is_int(n) or n != 1:
        raise InputError(f"body.n: only n = 1 is supported (one completion per request line), got {n!r}")

    kwargs: dict = {}
    limits = {k: get.pop(k) for k in ("max_tokens", "max_completion_tokens") if k in get}
    if len(limits) == 2 and limits["max_tokens"] != limits["max_completion_tokens"]:
        raise InputError(f"body.max_completion_tokens: {limits['max_completion_tokens']!r} differs from "
                         f"body.max_tokens {limits['max_tokens']!r}; give one of them")
    for k, v in limits.items():
        if not is_int(v) or v < 1:
            raise InputError(f"body.{k}: expected an integer >= 1, got {type(v).__name__} {v!r}")
        kwargs["max_tokens"] = v
    kwargs.setdefault("max_tokens", default_max_tokens)

    for k in ("temperature", "top_p"):
        if k in get:
            if not is_number(get[k]):
                raise InputError(f"body.{k}: expected a number, got {type(get[k]).__name__} {get[k]!r}")
            kwargs[k] = get[k]
    for k in ("top_k", "seed"):
        if k in get:
            if not is_int(get[k]):
                raise InputError(f"body.{k}: expected an integer, got {type(get[k]).__name__} {get[k]!r}")
            kwargs[k] = get[k]
    for k in ("ignore_eos", "return_token_ids"):
        if k in get:
            if not isinstance(get[k], bool):
                raise InputError(f"body.{k}: expected true or false, got {get[k]!r}")
            kwargs[k] = get[k]

    if "stop" in get:
        stop = get["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list):
            raise InputError(f"body.stop: expected a string or a list of strings, got {type(stop).__name__}")
        kwargs["stop"] = tuple(stop)
    if "stop_token_ids" in get:
        ids = get["stop_token_ids"]
        if not isinstance(ids, list):
            raise InputError(f"body.stop_token_ids: expected a list of token ids, got {type(ids).__name__}")
        kwargs["stop_token_ids"] = tuple(ids)

    try:
        return SamplingParams(**kwargs)
    except InputError as e:
        # The dataclass names the field ("top_p: ..."); the body's reader knows it came from the body.
        raise InputError(f"body.{e}") from None

