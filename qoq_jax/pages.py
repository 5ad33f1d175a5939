"""KV-cache pages on the host: the allocator, and the prefix cache that shares full pages.

A sequence owns a list of pages (its row of the page table). With prefix caching, a *full*
page whose tokens and predecessors are known is registered under a hash chained over its
tokens and the page before (``page_hashes``), so a later sequence with the same leading tokens
finds it (``lookup``) and takes a reference instead of computing it again (``share``). Pages
are reference-counted: one held by no sequence stays cached, evictable, and is reused
least-recently-released first only when no never-used page is left. A shared page is never
written: a sequence writes only positions past the pages it shares (the scheduler never shares
the page holding a sequence's last context token, which that sequence must compute).

Page 0 is the scratch page (padding and finished rows write there) and is never handed out.
Plain Python, no JAX.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

SCRATCH_PAGE = 0


class OutOfPagesError(RuntimeError):
    """The KV cache has no free page left for a request."""


def page_hashes(tokens: Sequence[int], page_size: int, salt: bytes = b"") -> list[bytes]:
    """The chained hash of every full page of `tokens`: page i's covers its tokens and, through
    page i-1's hash, everything before them (and `salt`: what else decides the K/V)."""
    out, parent = [], hashlib.blake2b(salt, digest_size=16).digest()
    arr = np.asarray(tokens, np.int64)
    for i in range(len(tokens) // page_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(arr[i * page_size:(i + 1) * page_size].tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class PageAllocator:
    """Reference-counted pages with an LRU prefix cache (see the module docstring).

    caching=False: pages are never registered, so nothing is ever shared (a plain allocator).
    """

    def __init__(self, num_pages: int, page_size: int, *, caching: bool = False):
        if num_pages < 2:
            raise ValueError("a paged KV cache needs at least 2 pages (page 0 is scratch)")
        self.num_pages, self.page_size = num_pages, page_size
        self.caching = caching
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low pages first
        self._owned: dict[int, list[int]] = {}
        self._refs = [0] * num_pages
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # cached pages no sequence holds, least recently released first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.evictions = 0

    # ------------------------------------------------------------------------------------------
    # counts

    @property
    def num_free(self) -> int:
        """Pages a sequence can get now (never used, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (held or evictable)."""
        return len(self._by_hash)

    @property
    def owners(self):
        """The sequence ids that hold pages (a live view)."""
        return self._owned.keys()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages(self, seq_id: int) -> list[int]:
        return list(self._owned.get(seq_id, ()))

    # ------------------------------------------------------------------------------------------
    # allocation

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        page, _ = self._evictable.popitem(last=False)  # the least recently released
        del self._by_hash[self._hash_of.pop(page)]
        self.evictions += 1
        return page

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make `seq_id` hold enough pages for `num_tokens` tokens; returns its page list."""
        created = seq_id not in self._owned
        owned = self._owned.setdefault(seq_id, [])
        need = self.pages_for(num_tokens) - len(owned)
        if need > self.num_free:
            if created:
                del self._owned[seq_id]
            raise OutOfPagesError(
                f"sequence {seq_id} needs {need} more KV-cache pages of {self.page_size} tokens, "
                f"but only {self.num_free} of {self.num_pages - 1} are free")
        for _ in range(max(need, 0)):
            page = self._take()
            self._refs[page] = 1
            owned.append(page)
        return list(owned)

    def trim(self, seq_id: int, num_tokens: int) -> int:
        """Drop `seq_id`'s pages past the first pages_for(num_tokens) (speculative decoding:
        pages that held only rejected positions); returns how many it dropped."""
        owned = self._owned.get(seq_id)
        if owned is None:
            return 0
        keep = self.pages_for(num_tokens)
        extra = owned[keep:]
        del owned[keep:]
        for page in reversed(extra):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._hash_of:
                self._evictable[page] = None
            else:
                self._free.append(page)
        return len(extra)

    def free(self, seq_id: int) -> None:
        """Drop every page reference of `seq_id`: unshared unregistered pages become free,
        registered ones stay cached (evictable) until another sequence needs the room."""
        pages = self._owned.pop(seq_id, None)
        if pages is None:
            raise KeyError(f"sequence {seq_id} owns no pages")
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._hash_of:
                self._evictable[page] = None
            else:
                self._free.append(page)

    # ------------------------------------------------------------------------------------------
    # the prefix cache

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `hashes` (stops at the first miss)."""
        if not self.caching:
            return []
        out = []
        for h in hashes:
            page = self._by_hash.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def share(self, seq_id: int, pages: Sequence[int]) -> None:
        """`seq_id` (holding nothing yet) takes a reference on cached `pages` (from lookup)."""
        if self._owned.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds pages")
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
        self._owned[seq_id] = list(pages)

    def register(self, seq_id: int, index: int, page_hash: bytes) -> None:
        """Page `index` of `seq_id` is full (its K/V written or being written by a dispatched
        program) and holds the tokens `page_hash` names: later sequences may share it. If
        another page already holds the same tokens, this one stays private."""
        if not self.caching:
            return
        page = self._owned[seq_id][index]
        if page_hash in self._by_hash or page in self._hash_of:
            return
        self._by_hash[page_hash] = page
        self._hash_of[page] = page_hash

    def clear_cache(self) -> int:
        """Forget every cached page no sequence holds (they become free); returns how many."""
        n = len(self._evictable)
        for page in self._evictable:
            del self._by_hash[self._hash_of.pop(page)]
            self._free.append(page)
        self._evictable.clear()
        return n

    def page_table(self, seq_ids: list[int], max_pages: int) -> np.ndarray:
        """int32 [len(seq_ids), max_pages]; unused entries point at the scratch page."""
        table = np.full((len(seq_ids), max_pages), SCRATCH_PAGE, np.int32)
        for row, sid in enumerate(seq_ids):
            pages = self._owned.get(sid, [])
            if len(pages) > max_pages:
                raise ValueError(f"sequence {sid} owns {len(pages)} pages > max_pages {max_pages}")
            table[row, :len(pages)] = pages
        return table
