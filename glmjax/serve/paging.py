"""The host side of a paged KV cache: which pages each slot holds.

The device cache (glmjax.serve.kv_cache, `page_size`) is a pool of pages and a page table [slots, S / page].
The engine asks this allocator for a request's pages when it admits the request, and gives them back when
the request finishes; the table it keeps is copied to the device whenever it changes. A request reserves
the pages of its whole budget (prompt + max_tokens) at admission, so a running request never runs out
and nothing is ever preempted; memory follows the requests in flight, not slots x max_len. A request whose
pages are not free waits (first come, first served); one that needs more pages than the pool holds can
never run and is refused up front.
"""

from __future__ import annotations

import numpy as np

from glmjax.errors import InputError


class PageAllocator:
    """Pages 0..num_pages-1 of page_size tokens, handed to `slots` slots of up to max_pages pages each.

    groups: the slots and the pages are split into this many equal, contiguous groups (the mesh's slot groups:
    a group's pages live on the devices that serve its slots), and a slot takes pages of its own group."""

    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages: int, groups: int = 1):
        if num_pages % groups or slots % groups:
            raise ValueError(f"page allocator: {num_pages} pages and {slots} slots must split into {groups} groups")
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.group_pages, self.group_slots = num_pages // groups, slots // groups
        self.table = np.full((slots, max_pages), -1, np.int32)
        # pop() hands out each group's lowest page first
        self._free = [list(range((g + 1) * self.group_pages - 1, g * self.group_pages - 1, -1)) for g in range(groups)]

    @property
    def free_pages(self) -> int:
        return sum(len(f) for f in self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def check(self, request_id: str, tokens: int) -> None:
        """InputError if `tokens` can never fit: more pages than a slot group's pool or a slot's table holds."""
        need = self.pages_for(tokens)
        if need > min(self.group_pages, self.max_pages):
            where = "the cache holds" if len(self._free) == 1 else "each of the mesh's slot groups holds"
            raise InputError(f"request {request_id}: {tokens} tokens (prompt + max_tokens) need {need} pages of "
                             f"{self.page_size} tokens; {where} {self.group_pages} pages, a slot at most "
                             f"{self.max_pages}: it can never run (raise num_pages or lower max_tokens)")

    def fits(self, slot: int, tokens: int) -> bool:
        """Whether `slot`'s group has the pages for `tokens` positions free now."""
        return self.pages_for(tokens) <= len(self._free[slot // self.group_slots])

    def assign(self, slot: int, tokens: int) -> None:
        """Gives `slot` the pages for `tokens` positions from its group (the slot must hold none)."""
        need, free = self.pages_for(tokens), self._free[slot // self.group_slots]
        if need > len(free):
            raise RuntimeError(f"page allocator: {need} pages wanted, {len(free)} free in slot {slot}'s group")
        if (self.table[slot] >= 0).any():
            raise RuntimeError(f"page allocator: slot {slot} still holds pages")
        self.table[slot, :need] = [free.pop() for _ in range(need)]

    def release(self, slot: int) -> None:
        """Takes back every page of `slot`."""
        held = self.table[slot][self.table[slot] >= 0]
        self._free[slot // self.group_slots].extend(int(p) for p in held[::-1])
        self.table[slot] = -1
