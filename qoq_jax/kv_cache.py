"""The paged KV cache: device-side page pools (16-bit or KV4). The host side (which sequence
holds which pages, the prefix cache) is qoq_jax/pages.py.

Every layer's K and V live in one pool each (formats in pallas_kernels: ``[L, num_pages, Hkv,
page_size, D]`` for 16 bits, packed UINT4 codes plus fp16 scale and zero for KV4), so the jitted
step carries a handful of arrays and updates them in place (the caller donates them). A sequence
owns a list of pages, given to the kernels as a row of an int32 page table. Page 0 is reserved
as scratch: writes for padding positions and finished sequences are sent there, so a padded
batch never touches another sequence's pages.

Both cache classes have the same interface, which is all the model sees:
``write(layer, k, v, cos, sin, page, slot)`` (k [T, Hkv, D] before RoPE, one (page, slot) per
token of a ragged batch's flat axis) and ``attention(q, layer, layout, splits)`` (the batch's
queries [T, Hq, D], decode rows and prefill chunks alike, each over every key the cache holds
for its sequence up to its position; ``layout`` is the batch's RaggedLayout).

A cache also carries, as static data (part of every program's cache key), which kernels run
on it: ``backend="pallas"`` (the Pallas kernels: a GPU, or a lowering test) or ``"xla"`` (the
references: CPU). It is decided once, when the engine builds its pools for its platform.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.kv4 import RANGE_RATIOS, kv4_write
from pallas_kernels.paged_attention import RaggedLayout, ragged_paged_attention
from qoq_jax.layers import apply_rope
from qoq_jax.pages import SCRATCH_PAGE, OutOfPagesError, PageAllocator  # noqa: F401 (re-exported)

KV_CACHE_KINDS = ("16bit", "kv4", "kv4-minmax")
KERNEL_BACKENDS = ("pallas", "xla")


def kernel_backend(platform: str | None = None) -> str:
    """The cache kernels for a platform: the Pallas kernels on a GPU, the XLA references
    elsewhere (platform: "gpu", "cuda", "cpu", ...; default: jax's default backend)."""
    platform = jax.default_backend() if platform is None else platform
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "xla"


def _static(default):
    return dataclasses.field(default=default, metadata=dict(static=True))


class _PagePools:
    """What both cache kinds share: their first pool is [L, num_pages, Hkv, page_size, ...]."""

    k: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache(_PagePools):
    """16-bit pools [L, num_pages, Hkv, page_size, D], keys stored after RoPE."""

    k: jax.Array
    v: jax.Array
    backend: str = _static("xla")

    @classmethod
    def zeros(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
              head_dim: int, dtype, backend: str = "xla") -> "PagedKVCache":
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), backend=backend)

    def write(self, layer, k, v, cos, sin, page, slot) -> "PagedKVCache":
        """RoPE the keys, then scatter k/v [T, Hkv, D] at (page, slot) [T] of `layer`."""
        k = apply_rope(k, cos, sin)
        at = (layer, page, slice(None), slot)  # the token index dims come first
        return dataclasses.replace(self, k=self.k.at[at].set(k.astype(self.k.dtype)),
                                   v=self.v.at[at].set(v.astype(self.v.dtype)))

    def attention(self, q, layer, layout: RaggedLayout, splits: int = 1):
        return ragged_paged_attention(q, self.k, self.v, layer, layout, splits=splits,
                                      backend=self.backend)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV4Cache(_PagePools):
    """KV4 pools: codes uint8 [L, N, Hkv, P, D/2], scale/zero fp16 [L, N, Hkv, P] (kv4.py).
    Each row's range is searched as it is written (kv4.RANGE_RATIOS)."""

    range_ratios = RANGE_RATIOS  # a class constant, not a pytree field

    k: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    v: jax.Array
    v_scale: jax.Array
    v_zero: jax.Array
    backend: str = _static("xla")

    @classmethod
    def zeros(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
              head_dim: int, dtype=None, backend: str = "xla") -> "PagedKV4Cache":
        del dtype  # the format fixes every dtype
        codes = (num_layers, num_pages, num_kv_heads, page_size, head_dim // 2)
        stats = codes[:-1]
        # six distinct buffers (they are donated; a shared one could not be)
        return cls(*(f(shape, dtype) for _ in range(2) for f, shape, dtype in (
            (jnp.zeros, codes, jnp.uint8), (jnp.ones, stats, jnp.float16),
            (jnp.zeros, stats, jnp.float16))), backend=backend)

    def _pools(self):
        return (self.k, self.k_scale, self.k_zero, self.v, self.v_scale, self.v_zero)

    def write(self, layer, k, v, cos, sin, page, slot) -> "PagedKV4Cache":
        """Fused RoPE + KV4 quantization + paged write (one kernel on a GPU)."""
        return type(self)(*kv4_write(self._pools(), layer, k, v, cos, sin, page, slot,
                                     ratios=self.range_ratios, backend=self.backend),
                          backend=self.backend)

    def attention(self, q, layer, layout: RaggedLayout, splits: int = 1):
        return ragged_paged_attention(
            q, self.k, self.v, layer, layout, splits=splits, backend=self.backend,
            kv4_scales=(self.k_scale, self.k_zero, self.v_scale, self.v_zero))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype=None) -> int:
        del dtype  # codes: D/2 bytes; scale and zero: 2 bytes each, for K and for V
        return 2 * num_layers * num_kv_heads * (head_dim // 2 + 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV4MinMaxCache(PagedKV4Cache):
    """The same pools, each row quantized over its [min, max] (QServe's KV4 quantizer, for
    comparison: docs/ACCURACY.md)."""

    range_ratios = (1.0,)


def cache_class(kind: str) -> type:
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"KV cache kind must be one of {KV_CACHE_KINDS}, not {kind!r}")
    return {"16bit": PagedKVCache, "kv4": PagedKV4Cache, "kv4-minmax": PagedKV4MinMaxCache}[kind]


def kv_range_ratios(kind: str) -> tuple[float, ...]:
    """The KV4 quantizer's candidate ranges of a cache kind (what the quantization searches
    score keys with; a 16-bit cache: those of "kv4")."""
    return getattr(cache_class(kind), "range_ratios", RANGE_RATIOS)


def make_cache(kind: str, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, dtype, backend: str = "xla"):
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"cache kernels must be one of {KERNEL_BACKENDS}, not {backend!r}")
    return cache_class(kind).zeros(num_layers, num_pages, page_size, num_kv_heads, head_dim,
                                   dtype, backend=backend)


def slot_indices(page_table: jax.Array, token_seq: jax.Array, positions: jax.Array,
                 page_size: int) -> tuple[jax.Array, jax.Array]:
    """(page, slot) of each token of a ragged batch; padding tokens (token_seq < 0) map to the
    scratch page.

    page_table [S, max_pages] (one row per sequence); token_seq, positions [T] -> two [T] int32.
    """
    col = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = page_table[jnp.maximum(token_seq, 0), col]
    page = jnp.where(token_seq >= 0, page, SCRATCH_PAGE)
    return page.astype(jnp.int32), (positions % page_size).astype(jnp.int32)
