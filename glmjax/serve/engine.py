"""The serving engine: continuous batching over a fixed number of cache slots, with optional MTP speculative
decoding. The device work is the jitted programs of glmjax.serve.steps; this host loop only schedules:

    admit waiting requests into free slots, up to prefill_batch of them prefilled together (chunked
      prefill: a prompt never needs more than one chunk's activations; the last chunk samples the first
      token and drafts)
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
from glmjax.model.options import ModelOptions
from glmjax.model.transformer import GlmMoeDsa
from glmjax.serve import steps
from glmjax.serve.kv_cache import KVCache, Quant, cache_shapes, check_split, init_cache
from glmjax.serve.paging import PageAllocator
from glmjax.serve.requests import Request, fold_seed
from glmjax.serve.sampling import sampling_arrays
from glmjax.serve.text import StopChecker, TextCodec
from glmjax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec, mesh_axes, mesh_size, shard_model
from pallas_kernels.common import kernel_family


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: sequences decoded together (the cache holds slots x max_len tokens); max_len: prompt plus
    completion tokens per request; prefill_chunk: prompt tokens per request and prefill call; prefill_batch:
    waiting requests admitted and prefilled together, a chunk of each per call (a call holds prefill_batch x
    prefill_chunk tokens of activations; fewer waiting requests run in the next power of two of rows);
    num_speculative_tokens: MTP draft steps per verification (0: plain decoding); draft_sampling: "greedy"
    drafts (q one-hot) or drafts sampled from the MTP layer's distribution under the request's sampling
    parameters (both lossless); cache_dtype: None = the model's activation dtype; seed: base of the seeds of
    requests without one.

    The cache (glmjax.serve.kv_cache):
    - kv_seq_axes: the mesh axes every slot's cache is split over along the sequence (on a mesh; see
      serve_rules): each device holds max_len / (their size) positions of its slots.
    - page_size: a paged cache of num_pages pages of page_size tokens (default slots x max_len / page_size),
      handed to requests as they are admitted (each reserves prompt + max_tokens positions;
      glmjax.serve.paging) instead of a max_len slot each. On a mesh the pages split over the slot groups
      and the kv_seq shards (each shard holds the pages of its range of positions); with the Pallas TPU
      kernels a page holds a multiple of 128 positions.
    - kv_quant "fp8": latent rows in float8_e4m3fn with per-row scales (their rope dims in cache_dtype) and
      indexer keys 8-bit with per-token scales (float8_e4m3fn for the GPU kernels, int8 otherwise:
      index_key_dtype)."""

    slots: int = 8
    max_len: int = 2048
    prefill_chunk: int = 256
    prefill_batch: int = 1
    num_speculative_tokens: int = 0
    draft_sampling: Literal["greedy", "sample"] = "greedy"
    cache_dtype: str | None = None
    seed: int = 0
    kv_seq_axes: tuple[str, ...] = ("context",)
    kv_quant: Quant = "none"
    page_size: int | None = None
    num_pages: int | None = None

    @property
    def pool_pages(self) -> int | None:
        """Pages of a paged cache (num_pages; default as many as slots x max_len)."""
        if self.page_size is None:
            return None
        return self.num_pages or self.slots * self.max_len // self.page_size

    def __post_init__(self):
        for name in ("slots", "max_len", "prefill_chunk", "prefill_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise InputError(f"num_speculative_tokens: must be >= 0, got {self.num_speculative_tokens}")
        if self.draft_sampling not in ("greedy", "sample"):
            raise InputError(f"draft_sampling: {self.draft_sampling!r} is not 'greedy' or 'sample'")
        if self.kv_quant not in ("none", "fp8"):
            raise InputError(f"kv_quant: {self.kv_quant!r} is not 'none' or 'fp8'")
        if self.page_size is not None and (self.page_size < 1 or self.max_len % self.page_size):
            raise InputError(f"page_size: max_len {self.max_len} must be a multiple of page_size {self.page_size}")
        if self.num_pages is not None and (self.page_size is None or self.num_pages < 1):
            raise InputError("num_pages: needs page_size (a paged cache) and must be >= 1")
        allowed = ("data", "fsdp", "context", "expert")  # tensor splits the heads that share each row
        bad = [a for a in self.kv_seq_axes if a not in allowed]
        if bad or len(set(self.kv_seq_axes)) != len(self.kv_seq_axes):
            raise InputError(f"kv_seq_axes: {list(self.kv_seq_axes)} must be distinct mesh axes among {allowed}")


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
# mesh); held whole over expert they cost 8 GiB more per chip and the step gathers only activations. The
# same holds over context: its devices split the KV cache, not the weights.
def serve_rules(kv_seq_axes: tuple[str, ...] = ("context",)) -> dict[str, tuple[str, ...]]:
    """The serving engine's logical rules. The new tokens of a step are not split over the sequence (a decode
    step has one per slot); the cache's sequence axis ("kv_seq") is split over `kv_seq_axes` (a
    sequence-sharded cache: every slot's keys in contiguous shards), and the slots over the batch axes left
    (data, fsdp, expert). For one long request on a context x expert x tensor mesh, ("context", "expert")
    gives every device of a tensor group its own share of the sequence. A paged cache's pools are split over
    the slots' axes and the sequence's ("kv_pages"): each slot group's pages live with its slots, and each
    sequence shard holds the pages of its contiguous range of every slot's positions."""
    batch = tuple(a for a in DEFAULT_RULES["batch"] if a not in kv_seq_axes)
    return {**DEFAULT_RULES, "batch": batch, "seq": (), "res_seq": ("tensor",), "kv_seq": tuple(kv_seq_axes),
            "kv_pages": batch + tuple(kv_seq_axes), "embed": ("fsdp",), "mtp_in": ("fsdp",)}


SERVE_RULES = serve_rules()


def slot_shardings(cache: KVCache, state: steps.SlotState, mesh: Mesh, rules=SERVE_RULES
                   ) -> tuple[KVCache, steps.SlotState]:
    """The engine's placement of cache and slot state (NamedShardings; works on arrays and ShapeDtypeStructs):
    every array's slot axis split over the rules' batch axes (outside the MoE the expert axis is
    data-parallel, so each expert-parallel group attends for its own slots), the cache's sequence axis over
    their "kv_seq" axes, the rest replicated: MLA's one latent row serves every head, so splitting heads over
    tensor would not split the cache. Slot and sequence axes: latent [G, L, B, S, W] 2 and 3, index_keys
    [G, B, S, DI] 1 and 2, the MTP cache [B, S, ...] 0 and 1, every SlotState field [B, ...] 0. A paged
    cache's pools [G, L, P, page, W] (etc.) split their page axis over "kv_pages" (slot groups x sequence
    shards) and keep each page whole; its page table [B, S / page] is split like the slots."""
    slots = logical_to_spec(("batch",), mesh=mesh, rules=rules)[0]
    rows, seq = slots, logical_to_spec(("kv_seq",), mesh=mesh, rules=rules)[0]
    if cache.paged:  # the pools' page axis over slot groups x sequence shards, every page whole
        rows, seq = logical_to_spec(("kv_pages",), mesh=mesh, rules=rules)[0], None

    def on(slot_axis: int, seq_axis: int | None = None, first=rows):
        def sharding(a) -> NamedSharding:
            axes = [None] * len(a.shape)
            axes[slot_axis] = first
            if seq_axis is not None:
                axes[seq_axis] = seq
            return NamedSharding(mesh, PartitionSpec(*axes))
        return sharding

    # (tree maps: a quantized buffer's parts share their leading axes)
    cache_sh = KVCache(tuple(jax.tree.map(on(2, 3), x) for x in cache.latent),
                       tuple(jax.tree.map(on(1, 2), x) for x in cache.index_keys),
                       jax.tree.map(on(0, 1), cache.mtp_latent), jax.tree.map(on(0, 1), cache.mtp_index_keys),
                       jax.tree.map(on(0, first=slots), cache.pages))
    return cache_sh, jax.tree.map(on(0, first=slots), state)


def prefill_rows(requests: int) -> int:
    """Rows of a prefill call for `requests` requests: the next power of two (few programs compile)."""
    return 1 << (requests - 1).bit_length()


def index_key_dtype(options: ModelOptions):
    """The 8-bit dtype of quantized indexer keys: float8_e4m3fn for the GPU scores kernel (its FP8 tensor-core
    path), int8 otherwise (the TPU layout packs them four positions to a uint32 word: glmjax.serve.kv_cache).
    int8 is the more accurate of the two for LayerNormed
    keys (a uniform step of amax / 127 against e4m3's 3-bit mantissa): on the demo model its logit KL against
    the bf16 cache is 4x lower (benchmarks/kv_fp8_error.py)."""
    if options.attention_impl != "reference" and kernel_family(options.attention_impl, options.interpret) == "gpu":
        return jnp.float8_e4m3fn
    return jnp.int8


class Engine:
    """Generation over a model; with `mesh`, the engine places the model (serve_rules), cache and slot state on
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
        self.rules = serve_rules(config.kv_seq_axes)
        self.sampled_drafts = bool(k) and config.draft_sampling == "sample"
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        dtype = jnp.dtype(config.cache_dtype) if config.cache_dtype else model.options.dtype
        lane_padded = model.options.attention_impl == "pallas_tpu"
        layout = dict(mtp=bool(k), dtype=dtype, lane_padded=lane_padded, scan_layers=model.options.scan_layers,
                      quant=config.kv_quant, key_dtype=index_key_dtype(model.options), page_size=config.page_size,
                      num_pages=config.pool_pages)
        splits = dict(slot_split=1, seq_split=1)
        if mesh is not None:
            with logical_rules(self.rules):
                slot_axes, seq_axes = mesh_axes("batch", mesh), mesh_axes("kv_seq", mesh)
            splits = dict(slot_axes=slot_axes, slot_split=mesh_size(slot_axes, mesh), seq_axes=seq_axes,
                          seq_split=mesh_size(seq_axes, mesh))
        check_split(cfg, slots=config.slots, max_len=config.max_len, quant=config.kv_quant, lane_padded=lane_padded,
                    page_size=config.page_size, num_pages=config.pool_pages, **splits)
        state = steps.init_state(config.slots, k, cfg.vocab_size, self.sampled_drafts)
        if mesh is not None:  # the cache is created split as it is served: never whole on one device
            shard_model(model, mesh, self.rules)
            cache_sh, state_sh = slot_shardings(cache_shapes(cfg, config.slots, config.max_len, **layout), state,
                                                mesh, self.rules)
        else:  # committed from the start: the programs see the same argument shardings on every call
            cache_sh = state_sh = jax.devices()[0]
        self.cache = init_cache(cfg, config.slots, config.max_len, sharding=cache_sh, **layout)
        self.state = jax.device_put(state, state_sh)
        self.pages = None
        if config.page_size is not None:  # each slot group's pages, in parts per sequence shard
            self.pages = PageAllocator(config.pool_pages, config.page_size, config.slots,
                                       config.max_len // config.page_size, groups=splits["slot_split"],
                                       seq_shards=splits["seq_split"])
        # The programs take the parameters as a flat list of arrays: jit flattens a list in C++, while an nnx
        # State's Variables flatten in Python (~1 ms per call for the demo's 100 arrays).
        self.graphdef, params = nnx.split(model)
        self.params, self.params_tree = jax.tree.flatten(params)
        self._programs: dict = {}
        self._served = 0
        # waited: admissions deferred because a request's cache pages were not free (a paged cache)
        self.stats = dict(prefill_s=0.0, step_s=0.0, steps=0, waited=0)

    # ------------------------------------------------------------------------------------------ programs

    def _program(self, name: str, **static):
        mine = (name, tuple(sorted(static.items())))
        if mine not in self._programs:
            # Engines over models of one config and options share programs (and so compilations); the
            # graphdef itself is not hashable (the config holds dicts).
            # The rules are read at trace time, so they are part of the key.
            key = (repr(self.model.config), self.model.options, tuple(sorted(self.rules.items())), mine)
            if key not in _PROGRAMS:
                _PROGRAMS[key] = jit_program(self.graphdef, self.params_tree, name, dict(static))
            self._programs[mine] = _PROGRAMS[key]
        return self._programs[mine]

    def _call(self, name: str, *args, **static):
        with contextlib.ExitStack() as scope:
            if self.mesh is not None:
                scope.enter_context(jax.set_mesh(self.mesh))
                # A prefill call's few requests are not split over the batch axes (every device of their
                # slot groups computes them).
                scope.enter_context(logical_rules({**self.rules, "batch": ()} if name == "prefill" else self.rules))
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
        if self.pages is not None:
            self.pages.check(request.id, self._budget(request))

    def _prefill(self, admitted: list[tuple[int, Request]]) -> list[int]:
        """Prefills the (slot, request) pairs together, a chunk of each per call -> their first tokens. The
        calls have the next power of two of rows; rows without a chunk (padding, or a prompt already done)
        write nothing."""
        C = min(self.config.prefill_chunk, self.config.max_len)
        R = prefill_rows(len(admitted))
        ids = [np.asarray(r.prompt_ids, np.int32) for _, r in admitted]
        ps, pad = [r.params for _, r in admitted], R - len(admitted)  # padding rows: greedy
        s = sampling_arrays([p.temperature for p in ps] + [0.0] * pad, [p.top_k for p in ps] + [0] * pad,
                            [p.top_p for p in ps] + [1.0] * pad, [self._seed(r) for _, r in admitted] + [0] * pad)
        slots = np.full((R,), admitted[0][0], np.int32)  # padding rows read the first request's slot
        slots[:len(admitted)] = [b for b, _ in admitted]
        first = [0] * len(admitted)
        for c0 in range(0, max(len(x) for x in ids), C):
            tokens, next_tokens = np.zeros((R, C), np.int32), np.zeros((R, C), np.int32)
            start = np.full((R,), self.config.max_len, np.int32)  # nothing to write: past the cache's end
            count, last = np.zeros((R,), np.int32), np.zeros((R,), bool)
            for r, x in enumerate(ids):
                if c0 >= len(x):
                    continue
                chunk, nxt = x[c0:c0 + C], x[c0 + 1:c0 + C + 1]
                tokens[r, :len(chunk)], next_tokens[r, :len(nxt)] = chunk, nxt
                start[r], count[r], last[r] = c0, len(chunk), c0 + C >= len(x)
            out = self._call("prefill", jnp.asarray(slots), jnp.asarray(tokens), jnp.asarray(next_tokens),
                             jnp.asarray(start), jnp.asarray(count), jnp.asarray(last), s, k=self.k,
                             sampled_drafts=self.sampled_drafts)
            if last.any():
                got = np.asarray(out[0])
                for r in np.flatnonzero(last[:len(admitted)]):
                    first[r] = int(got[r])
        return first

    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        waiting = iter(requests)
        slots: list[_Live | None] = [None] * self.config.slots
        held: Request | None = None  # the next request, waiting for cache pages (a paged cache)
        exhausted = False
        while True:
            while True:  # until no free slot takes a request (some finish at their first token)
                admitted: list[tuple[int, Request]] = []
                for b in range(len(slots)):
                    if slots[b] is not None:
                        continue
                    if exhausted or len(admitted) == self.config.prefill_batch:
                        break
                    request, held = held or next(waiting, None), None
                    if request is None:
                        exhausted = True
                        break
                    self.check(request)
                    if not self._reserve(b, request):
                        held = request  # first come, first served: nothing overtakes it (another slot group
                        self.stats["waited"] += 1  # may have its pages)
                        continue
                    admitted.append((b, request))
                if not admitted:
                    break
                t0 = time.perf_counter()
                lives = [_Live(r, StopChecker(r.params, self.codec, self.eos_ids), t0) for _, r in admitted]
                firsts = self._prefill(admitted)
                self.stats["prefill_s"] += time.perf_counter() - t0
                for (b, _), live, first in zip(admitted, lives, firsts, strict=True):
                    if live.add([first]):
                        self._free(b)
                        yield live.done()
                    else:
                        slots[b] = live
            if all(s is None for s in slots):
                if held is None:
                    return
                continue  # every page is free now: the held request fits (check() saw to it)
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
            finished = []
            for b, live in enumerate(slots):
                if live is None:
                    continue
                live.steps += 1
                if self.k:
                    live.accepted.append(int(accepted[b]))
                if live.add([int(t) for t in tokens[b, :int(accepted[b]) + 1]]):
                    slots[b] = None
                    finished.append(live)
                    self._free(b)
            yield from (live.done() for live in finished)

    # ------------------------------------------------------------------------------------------ pages

    def _budget(self, request: Request) -> int:
        """Positions a request may write: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.params.max_tokens

    def _reserve(self, slot: int, request: Request) -> bool:
        """Gives `slot` the pages of `request` (a paged cache) -> False when they are not free now."""
        if self.pages is None:
            return True
        if not self.pages.fits(slot, self._budget(request)):
            return False
        self.pages.assign(slot, self._budget(request))
        self._sync_pages()
        return True

    def _free(self, slot: int) -> None:
        if self.pages is not None:
            self.pages.release(slot)
            self._sync_pages()

    def _sync_pages(self) -> None:
        """The host page table onto the device, where the cache's table lives (placed as it was)."""
        self.cache = self.cache._replace(pages=jax.device_put(self.pages.table, self.cache.pages.sharding))

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
