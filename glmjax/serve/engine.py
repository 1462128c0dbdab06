"""The serving engine: continuous batching over a fixed number of cache slots, with optional MTP speculative
decoding. The device work is the jitted programs of glmjax.serve.steps; this host loop only schedules:

    admit waiting requests into free slots (chunked prefill: a prompt never needs more than one chunk's
      activations; the last chunk samples the first token and drafts)
    one step for every slot (decode, or verify + accept + draft)
    append each slot's new tokens, stop it (EOS / stop ids, max_tokens, stop strings), free its slot

A finished request frees its slot right away and the next waiting request is prefilled into it while the
other slots keep their state. Requests never wait on each other's lengths: each slot has its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.errors import InputError
from glmjax.model.transformer import GlmMoeDsa
from glmjax.serve import steps
from glmjax.serve.kv_cache import KVCache, init_cache
from glmjax.serve.requests import Request, fold_seed
from glmjax.serve.sampling import sampling_arrays
from glmjax.serve.text import StopChecker, TextCodec
from glmjax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec, mesh_axes, mesh_size, shard_model


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: sequences decoded together (the cache holds slots x max_len tokens); max_len: prompt plus
    completion tokens per request; prefill_chunk: prompt tokens per prefill call; num_speculative_tokens: MTP
    draft steps per verification (0: plain decoding); draft_sampling: "greedy" drafts (q one-hot) or drafts
    sampled from the MTP layer's distribution under the request's sampling parameters (both lossless);
    cache_dtype: None = the model's activation dtype; seed: base of the seeds of requests without one."""

    slots: int = 8
    max_len: int = 2048
    prefill_chunk: int = 256
    num_speculative_tokens: int = 0
    draft_sampling: Literal["greedy", "sample"] = "greedy"
    cache_dtype: str | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("slots", "max_len", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise InputError(f"num_speculative_tokens: must be >= 0, got {self.num_speculative_tokens}")
        if self.draft_sampling not in ("greedy", "sample"):
            raise InputError(f"draft_sampling: {self.draft_sampling!r} is not 'greedy' or 'sample'")


@dataclasses.dataclass
class Completion:
    """A finished request. tokens: the completion's ids (a final EOS or stop id included); text: its text
    (empty without a tokenizer); finish_reason "stop" (EOS, a stop id or string) or "length" (max_tokens);
    stop_reason: the stop string or id (None for EOS and length); steps: target forwards after the prefill
    (one per token without speculation); accepted: drafts accepted at each verification."""

    request: Request
    tokens: list[int]
    text: str
    finish_reason: str
    stop_reason: str | int | None = None
    steps: int = 0
    accepted: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per verification (1 + accepted drafts), averaged; None without speculation."""
        return 1.0 + float(np.mean(self.accepted)) if self.accepted else None


@dataclasses.dataclass
class _Live:
    request: Request
    checker: StopChecker
    started: float
    accepted: list[int] = dataclasses.field(default_factory=list)
    steps: int = 0

    def add(self, new: list[int]) -> bool:
        """Appends new tokens (those after a stop are dropped); -> whether the request is finished."""
        return self.checker.feed(new).finished

    def done(self) -> Completion:
        c = self.checker
        return Completion(self.request, list(c.token_ids), c.text, c.finish_reason, c.stop_reason, self.steps,
                          self.accepted, time.perf_counter() - self.started)


# Serving places weights without FSDP over the expert axis: training's FSDP layout would all-gather every
# non-expert weight on every decode step (8.25 GiB per chip per GLM-5.2 step on a tensor 4 x expert 16
# mesh); held whole over expert they cost 8 GiB more per chip and the step gathers only activations.
SERVE_RULES = {**DEFAULT_RULES, "embed": ("fsdp", "context"), "mtp_in": ("fsdp", "context")}


def slot_shardings(cache: KVCache, state: steps.SlotState, mesh: Mesh) -> tuple[KVCache, steps.SlotState]:
    """The engine's placement of cache and slot state (NamedShardings; works on arrays and ShapeDtypeStructs):
    every array's slot axis split over the mesh's batch axes (outside the MoE the expert axis is data-parallel,
    so each expert-parallel group attends for its own slots), the rest replicated: MLA's one latent row serves
    every head, so splitting heads over tensor would not split the cache (sequence sharding comes with
    1M-context serving). Slot axes: latent [G, L, B, S, W] 2, index_keys [G, B, S, DI] 1, the MTP cache
    [B, S, ...] and every SlotState field [B, ...] 0."""
    batch = logical_to_spec(("batch",), mesh=mesh)[0]

    def on(slot_axis: int):
        def sharding(a) -> NamedSharding:
            axes = [None] * len(a.shape)
            axes[slot_axis] = batch
            return NamedSharding(mesh, PartitionSpec(*axes))
        return sharding

    cache_sh = KVCache(tuple(map(on(2), cache.latent)), tuple(map(on(1), cache.index_keys)),
                       None if cache.mtp_latent is None else on(0)(cache.mtp_latent),
                       None if cache.mtp_index_keys is None else on(0)(cache.mtp_index_keys))
    return cache_sh, jax.tree.map(on(0), state)


class Engine:
    """Generation over a model; with `mesh`, the engine places the model (SERVE_RULES), cache and slot state on
    it.

    run(requests) yields a Completion per request as it finishes (not in request order). Prompts must fit:
    len(prompt) + max_tokens <= config.max_len (else InputError; the batch runner checks this per line)."""

    def __init__(self, model: GlmMoeDsa, config: EngineConfig = EngineConfig(), *, mesh: Mesh | None = None,
                 codec: TextCodec | None = None):
        cfg = model.config
        k = config.num_speculative_tokens
        if k and not len(model.mtp):
            raise InputError("num_speculative_tokens: the checkpoint has no MTP layer to draft with")
        self.model, self.config, self.mesh, self.codec = model, config, mesh, codec
        self.k = k
        self.sampled_drafts = bool(k) and config.draft_sampling == "sample"
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        dtype = jnp.dtype(config.cache_dtype) if config.cache_dtype else model.options.dtype
        lane_padded = model.options.attention_impl == "pallas_tpu"
        self.cache = init_cache(cfg, config.slots, config.max_len, mtp=bool(k), dtype=dtype,
                                lane_padded=lane_padded, scan_layers=model.options.scan_layers)
        self.state = steps.init_state(config.slots, k, cfg.vocab_size, self.sampled_drafts)
        if mesh is not None:
            self._place_on(mesh)
        else:  # committed from the start: the programs see the same argument shardings on every call
            self.cache, self.state = jax.device_put((self.cache, self.state), jax.devices()[0])
        # The programs take the parameters as a flat list of arrays: jit flattens a list in C++, while an nnx
        # State's Variables flatten in Python (~1 ms per call for the demo's 100 arrays).
        self.graphdef, params = nnx.split(model)
        self.params, self.params_tree = jax.tree.flatten(params)
        self._programs: dict = {}
        self._served = 0
        self.stats = dict(prefill_s=0.0, step_s=0.0, steps=0)

    def _place_on(self, mesh: Mesh) -> None:
        n = mesh_size(mesh_axes("batch", mesh), mesh)
        if self.config.slots % n:
            raise InputError(f"slots: {self.config.slots} slots do not split over the mesh's batch axes "
                             f"{list(mesh_axes('batch', mesh))} ({n} devices); use a multiple of {n}")
        with logical_rules(SERVE_RULES):
            shard_model(self.model, mesh, SERVE_RULES)
            self.cache, self.state = jax.device_put((self.cache, self.state),
                                                    slot_shardings(self.cache, self.state, mesh))

    # ------------------------------------------------------------------------------------------ programs

    def _program(self, name: str, **static):
        mine = (name, tuple(sorted(static.items())))
        if mine not in self._programs:
            # Engines over models of one config and options share programs (and so compilations); the
            # graphdef itself is not hashable (the config holds dicts).
            key = (repr(self.model.config), self.model.options, mine)
            if key not in _PROGRAMS:
                _PROGRAMS[key] = jit_program(self.graphdef, self.params_tree, name, dict(static))
            self._programs[mine] = _PROGRAMS[key]
        return self._programs[mine]

    def _call(self, name: str, *args, **static):
        with contextlib.ExitStack() as scope:
            if self.mesh is not None:
                scope.enter_context(jax.set_mesh(self.mesh))
                # One request: a prefill chunk's batch of 1 is not split (every device of its slot group
                # computes it).
                scope.enter_context(logical_rules({**SERVE_RULES, "batch": ()} if name == "prefill" else SERVE_RULES))
            out = self._program(name, **static)(self.params, self.cache, self.state, *args)
        self.cache, self.state = out[0], out[1]
        return out[2:]

    # ------------------------------------------------------------------------------------------ requests

    def _seed(self, request: Request) -> int:
        if request.params.seed is not None:
            return request.params.seed
        self._served += 1
        return fold_seed(hash((self.config.seed, self._served)))

    def check(self, request: Request) -> None:
        n, m = len(request.prompt_ids), request.params.max_tokens
        if n < 1:
            raise InputError(f"request {request.id}: empty prompt")
        if n + m > self.config.max_len:
            raise InputError(f"request {request.id}: prompt ({n} tokens) + max_tokens ({m}) exceeds the engine's "
                             f"max_len {self.config.max_len}")

    def _prefill(self, slot: int, request: Request) -> int:
        """Prefills `request` into `slot` chunk by chunk -> its first token."""
        p = request.params
        ids = np.asarray(request.prompt_ids, np.int32)
        C = min(self.config.prefill_chunk, self.config.max_len)
        s = sampling_arrays([p.temperature], [p.top_k], [p.top_p], [self._seed(request)])
        first = None
        for start in range(0, len(ids), C):
            chunk = ids[start:start + C]
            nxt = ids[start + 1:start + C + 1]
            tokens = np.zeros((1, C), np.int32)
            next_tokens = np.zeros((1, C), np.int32)
            tokens[0, :len(chunk)] = chunk
            next_tokens[0, :len(nxt)] = nxt
            last = start + C >= len(ids)
            out = self._call("prefill", jnp.int32(slot), jnp.asarray(tokens), jnp.asarray(next_tokens),
                             jnp.int32(start), jnp.int32(len(chunk)), jnp.bool_(last), s, k=self.k,
                             sampled_drafts=self.sampled_drafts)
            first = out[0]
        return int(first)

    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        waiting = iter(requests)
        slots: list[_Live | None] = [None] * self.config.slots
        exhausted = False
        while True:
            for b in range(len(slots)):
                while slots[b] is None and not exhausted:
                    request = next(waiting, None)
                    if request is None:
                        exhausted = True
                        break
                    self.check(request)
                    t0 = time.perf_counter()
                    live = _Live(request, StopChecker(request.params, self.codec, self.eos_ids), t0)
                    first = self._prefill(b, request)
                    self.stats["prefill_s"] += time.perf_counter() - t0
                    if live.add([first]):
                        yield live.done()
                    else:
                        slots[b] = live
            if all(s is None for s in slots):
                return
            active = np.array([s is not None for s in slots])
            t0 = time.perf_counter()
            if self.k:
                tokens, accepted = self._call("speculative", jnp.asarray(active), k=self.k,
                                              sampled_drafts=self.sampled_drafts)
            else:
                tokens, accepted = self._call("decode", jnp.asarray(active))
            tokens, accepted = np.asarray(tokens), np.asarray(accepted)
            self.stats["step_s"] += time.perf_counter() - t0
            self.stats["steps"] += 1
            for b, live in enumerate(slots):
                if live is None:
                    continue
                live.steps += 1
                if self.k:
                    live.accepted.append(int(accepted[b]))
                if live.add([int(t) for t in tokens[b, :int(accepted[b]) + 1]]):
                    slots[b] = None
                    yield live.done()

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """All completions, in request order."""
        requests = list(requests)
        done = {id(c.request): c for c in self.run(requests)}
        return [done[id(r)] for r in requests]


_PROGRAMS: dict = {}


def jit_program(graphdef, params_tree, name: str, static: dict):
    """The jitted program `steps.<name>`: the model's parameters as the leaves of `params_tree` (the treedef of
    its nnx.State), cache and slot state in; cache and state donated."""
    fn = getattr(steps, name)

    def run(params, cache, state, *args):
        return fn(nnx.merge(graphdef, jax.tree.unflatten(params_tree, params)), cache, state, *args, **static)

    return jax.jit(run, donate_argnums=(1, 2))
