"""The host side of a paged KV cache: which pages each slot holds.

The device cache (glmjax.serve.kv_cache, `page_size`) is a pool of pages and a page table [slots, S / page].
The engine asks this allocator for a request's pages when it admits the request, and gives them back when
the request finishes; the table it keeps is copied to the device whenever it changes. A request reserves
the pages of its whole budget (prompt + max_tokens) at admission, so a running request never runs out
and nothing is ever preempted; memory follows the requests in flight, not slots x max_len. A request whose
pages are not free waits (first come, first served); one that needs more pages than the pool holds can
never run and is refused up front.

On a cache split over the sequence (seq_shards n), each of a slot group's n sequence shards holds its own
part of the group's pages, and a slot's logical page j (positions j * page ..) comes from shard
j // (max_pages / n): each shard keeps its contiguous range of every slot's positions, as a slot cache split
over the sequence does.
"""

from __future__ import annotations

import collections

import numpy as np

from glmjax.errors import InputError


class PageAllocator:
    """Pages 0..num_pages-1 of page_size tokens, handed to `slots` slots of up to max_pages pages each.

    groups: the slots and the pages are split into this many equal, contiguous groups (the mesh's slot groups:
    a group's pages live on the devices that serve its slots), and a slot takes pages of its own group.
    seq_shards: each group's pages are split again into this many contiguous parts, one per sequence shard
    (the module docstring); pool part g * seq_shards + i is group g's shard i."""

    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages: int, groups: int = 1,
                 seq_shards: int = 1):
        parts = groups * seq_shards
        if num_pages % parts or slots % groups or max_pages % seq_shards:
            raise ValueError(f"page allocator: {num_pages} pages must split into {groups} groups x {seq_shards} "
                             f"sequence shards, {slots} slots into the groups and {max_pages} pages per slot "
                             f"into the shards")
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.part_pages, self.group_slots, self.seq_shards = num_pages // parts, slots // groups, seq_shards
        self.table = np.full((slots, max_pages), -1, np.int32)
        # pop() hands out each part's lowest page first
        self._free = [list(range((q + 1) * self.part_pages - 1, q * self.part_pages - 1, -1)) for q in range(parts)]

    @property
    def free_pages(self) -> int:
        return sum(len(f) for f in self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _parts(self, slot: int, tokens: int) -> list[int]:
        """The pool part each of `slot`'s logical pages for `tokens` positions comes from (its group's part of
        the sequence shard holding that page's positions)."""
        per_shard, first = self.max_pages // self.seq_shards, (slot // self.group_slots) * self.seq_shards
        return [first + j // per_shard for j in range(self.pages_for(tokens))]

    def _needs(self, slot: int, tokens: int) -> dict[int, int]:
        """Pool part -> pages `slot` needs from it for `tokens` positions."""
        return collections.Counter(self._parts(slot, tokens))

    def check(self, request_id: str, tokens: int) -> None:
        """InputError if `tokens` can never fit: more pages than a slot's table holds, or than one pool part
        (a slot group's, or its sequence shard's) holds."""
        need = self.pages_for(tokens)
        most = max(self._needs(0, tokens).values(), default=0)
        if need > self.max_pages or most > self.part_pages:
            where = ("the cache holds" if len(self._free) == 1 else
                     "each of the mesh's slot groups holds" if self.seq_shards == 1 else
                     "each sequence shard of a slot group holds")
            raise InputError(f"request {request_id}: {tokens} tokens (prompt + max_tokens) need {need} pages of "
                             f"{self.page_size} tokens; {where} {self.part_pages} pages, a slot at most "
                             f"{self.max_pages}: it can never run (raise num_pages or lower max_tokens)")

    def fits(self, slot: int, tokens: int) -> bool:
        """Whether the pages for `tokens` positions of `slot` are free now (in its group, on each shard)."""
        return all(n <= len(self._free[q]) for q, n in self._needs(slot, tokens).items())

    def assign(self, slot: int, tokens: int) -> None:
        """Gives `slot` the pages for `tokens` positions (the slot must hold none)."""
        if not self.fits(slot, tokens):
            raise RuntimeError(f"page allocator: the pages for {tokens} positions of slot {slot} are not free")
        if (self.table[slot] >= 0).any():
            raise RuntimeError(f"page allocator: slot {slot} still holds pages")
        parts = self._parts(slot, tokens)
        self.table[slot, :len(parts)] = [self._free[q].pop() for q in parts]

    def release(self, slot: int) -> None:
        """Takes back every page of `slot`."""
        for p in self.table[slot][self.table[slot] >= 0][::-1]:
            self._free[int(p) // self.part_pages].append(int(p))
        self.table[slot] = -1
