"""The W4A8 weight formats (defined once here; the converter and the kernels import them).

A linear weight W [N=out, K=in] becomes 4-bit codes q in 0..15, packed two per byte, plus
per-channel or progressive per-group scales (QServe, arXiv 2405.04532, sections 1.3 and 1.4 of
../shared/reference/qserve_spec.md; docs/FORMATS.md):

Nibble layout (``qweight``, uint8 [N, K/2], K-contiguous like Hugging Face's weights and like the
K-major operand of the INT8 tensor-core instructions): K is cut into chunks of 64; byte j
(0..31) of chunk c holds k = 64c + j in its low nibble and k = 64c + 32 + j in its high nibble.
So a kernel that loads the 32 bytes of a chunk gets two ready [N, 32] operands with one mask
and one shift: no interleaving, no value slicing, no concatenation along K inside the kernel
(those pass interpret mode but fail Triton lowering).

Per-channel (``W4PerChannel``; the paper's zint4 with an integer zero, shifted to UINT4):
    s = fp16((hi - lo) / 15),  z = clamp(round(-lo / s), 0, 15),  q = clamp(round(w / s) + z, 0, 15)
    w_hat = s * (q - z);  stored: scale = s, szero = fp16(z * s)
    The GEMM feeds raw q (0..15) to the INT8 dot and corrects in the epilogue:
    y = s_x * s * sum_k(x_q * q) - szero * sum_k(x).

Progressive group (``W4Group``, "g128"; group 128, or 64 where K is not a multiple of 128):
    level 1, per row:    s1 = fp16(max|w| / P), P = 119 (the protective range);
                         w1 = clamp(w / s1, -P, P), real-valued (not rounded)
    level 2, per group:  s2 = clamp(round((hi1 - lo1) / 15), 1, 127) (an integer, <= 16 here)
                         z = clamp(round(-lo1 / s2), 0, 15),  q = clamp(round(w1 / s2) + z, 0, 15)
    w8 = (q - z) * s2 is an exact INT8 value (P = 119 guarantees |w8| <= 127), w_hat = s1 * w8.
    Stored: s1 [N] fp16, s2 [K/g, N] int8, szero = z * s2 [K/g, N] uint8 (0..240).
    The GEMM forms w8 = q * s2 - szero in registers, before the INT8 dot: the K loop never
    rescales in floating point.

Rounding is round-half-to-even throughout (numpy's rint), as in the reference implementation.

Runtime INT8 form (``W4Int8``, made by ``to_int8`` from either format; not stored in
checkpoints): the GEMM's INT8 weight operand [N, K] unpacked once, so that XLA:CPU's
int8 x int8 -> int32 dot runs it directly (the CPU route of the W4A8 GEMM):
    per-channel: values = q (0..15), scale = s, szero = szero (the same epilogue)
    group:       values = w8 = q * s2 - szero, scale = s1, szero = None
Twice the bytes of the packed weight (1 byte per weight instead of 1/2), same numbers.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 64  # K elements per packed chunk (32 bytes per row)
HALF = CHUNK // 2
PROTECTIVE_RANGE = 119  # P: keeps (q - z) * s2 inside INT8 for the progressive format
SUPPORTED_GROUP_SIZES = (64, 128)


class FormatError(ValueError):
    """A weight shape or argument the format cannot represent."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class W4PerChannel:
    qweight: Any  # uint8 [N, K/2]
    scale: Any  # fp16 [N]
    szero: Any  # fp16 [N]: zero * scale

    @property
    def shape(self) -> tuple[int, int]:
        n, k2 = self.qweight.shape[-2:]
        return n, 2 * k2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class W4Group:
    qweight: Any  # uint8 [N, K/2]
    s1: Any  # fp16 [N]
    s2: Any  # int8 [K/g, N]
    szero: Any  # uint8 [K/g, N]: zero * s2
    group_size: int = dataclasses.field(metadata=dict(static=True), default=128)

    @property
    def shape(self) -> tuple[int, int]:
        n, k2 = self.qweight.shape[-2:]
        return n, 2 * k2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class W4Int8:
    """The W4 weight as the INT8 operand of the GEMM, unpacked once (``to_int8``): the CPU route.

    values: int8 [..., N, K]. Per-channel: the raw codes q (0..15); progressive group: the
    exact INT8 level w8 = q * s2 - szero (what the GPU kernels form in registers).
    scale: fp16 [..., N]: per-channel s, group s1. szero: fp16 [..., N] (per-channel: the zero
    correction of the epilogue, szero * row_sum) or None (group). The epilogue is the packed
    formats': y = acc * s_x * scale (- szero * row_sum). A K-slice (values[..., k0:k1], scale
    and szero unchanged) gives the partial product of those K inputs, as a K-slice of the packed
    format does (row-parallel tensor parallelism: row_sum is then the slice's own part).
    """

    values: Any  # int8 [N, K]
    scale: Any  # fp16 [N]
    szero: Any = None  # fp16 [N] (per-channel) or None (group)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[-2:])

    @property
    def per_channel(self) -> bool:
        """True for the per-channel format (the epilogue needs the activations' row sums)."""
        return self.szero is not None


class WeightFormat(str, enum.Enum):
    """The W4 weight formats by name: per-channel, or progressive groups of 128 or 64.

    A string enum, so it is stored in JSON as its value. ``parse`` also reads the older spelling
    by group size (-1, 128, 64) that checkpoints written before this type still carry.
    """

    PER_CHANNEL = "per-channel"
    G128 = "g128"
    G64 = "g64"

    @property
    def group_size(self) -> int | None:
        """Inputs per quantization group; None for per-channel (one group per output row)."""
        return {"g128": 128, "g64": 64}.get(self.value)

    @property
    def is_group(self) -> bool:
        return self is not WeightFormat.PER_CHANNEL

    def for_input_size(self, k: int) -> "WeightFormat":
        """The format a layer with K inputs gets: g128 falls back to g64 where K % 128 != 0."""
        if not self.is_group:
            return self
        return WeightFormat.parse(group_size_for(k, self.group_size))

    @classmethod
    def parse(cls, value: "WeightFormat | str | int") -> "WeightFormat":
        if isinstance(value, cls):
            return value
        legacy = {-1: cls.PER_CHANNEL, 128: cls.G128, 64: cls.G64}
        if isinstance(value, int) and not isinstance(value, bool) and value in legacy:
            return legacy[value]
        if isinstance(value, str):
            text = value.strip().lower().replace("_", "-")
            if text.lstrip("-").isdigit() and int(text) in legacy:
                return legacy[int(text)]
            for member in cls:
                if text in (member.value, member.name.lower().replace("_", "-")):
                    return member
        raise FormatError(f"unknown weight format {value!r}; known: "
                          f"{', '.join(m.value for m in cls)}")


def group_size_for(k: int, requested: int) -> int:
    """The group size a layer with K inputs gets: 128 falls back to 64 where K % 128 != 0."""
    if requested not in SUPPORTED_GROUP_SIZES:
        raise FormatError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, not {requested}")
    if k % requested == 0:
        return requested
    if k % 64 == 0:
        return 64
    raise FormatError(f"input size K={k} is not a multiple of 64; no group size fits")


def check_shape(n: int, k: int) -> None:
    if k % CHUNK:
        raise FormatError(f"W4 weights need K (in features) to be a multiple of {CHUNK}, got K={k}")
    if n % 64:
        raise FormatError(f"W4 weights need N (out features) to be a multiple of 64, got N={n}")


# ----------------------------------------------------------------------------------------------
# Nibble packing


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """Codes q [..., N, K] (0..15) -> uint8 [..., N, K/2] in the chunked nibble layout."""
    q = np.asarray(q)
    k = q.shape[-1]
    if k % CHUNK:
        raise FormatError(f"K={k} is not a multiple of {CHUNK}")
    if q.min(initial=0) < 0 or q.max(initial=0) > 15:
        raise FormatError("4-bit codes must lie in 0..15")
    c = q.astype(np.uint8).reshape(*q.shape[:-1], k // CHUNK, 2, HALF)
    packed = c[..., 0, :] | (c[..., 1, :] << 4)
    return packed.reshape(*q.shape[:-1], k // 2)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., N, K/2] -> codes uint8 [..., N, K]; the inverse of pack_uint4."""
    p = np.asarray(packed)
    k2 = p.shape[-1]
    c = p.reshape(*p.shape[:-1], k2 // HALF, 1, HALF)
    both = np.concatenate([c & 0xF, c >> 4], axis=-2)
    return both.reshape(*p.shape[:-1], 2 * k2)


# ----------------------------------------------------------------------------------------------
# Quantization (round-to-nearest; the QoQ pipeline passes its own clipped ranges)


def per_channel_params(w: np.ndarray, lo: np.ndarray | None = None,
                       hi: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale fp16 [N], integer zero float32 [N]) covering [lo, hi] per row (default min/max)."""
    w = np.asarray(w, np.float32)
    lo = np.minimum(w.min(axis=1) if lo is None else np.asarray(lo, np.float32), 0.0)
    hi = np.maximum(w.max(axis=1) if hi is None else np.asarray(hi, np.float32), 0.0)
    s = ((hi - lo) / 15.0).astype(np.float16)
    s = np.where(s == 0, np.float16(1.0), s)  # an all-zero row
    z = np.clip(np.rint(-lo / s.astype(np.float32)), 0, 15).astype(np.float32)
    return s, z


def per_channel_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Round-to-nearest codes of w [N, K] (or one column [N]) for given row scales and zeros."""
    w = np.asarray(w, np.float32)
    s, z = scale.astype(np.float32), zero
    if w.ndim == 2:
        s, z = s[:, None], z[:, None]
    return np.clip(np.rint(w / s) + z, 0, 15)


def per_channel_format(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> W4PerChannel:
    return W4PerChannel(pack_uint4(q), scale, (zero * scale.astype(np.float32)).astype(np.float16))


def quantize_per_channel(w: np.ndarray, lo: np.ndarray | None = None,
                         hi: np.ndarray | None = None) -> W4PerChannel:
    """W [N, K] float -> W4PerChannel. lo/hi [N]: the range to cover (default: min/max of W)."""
    w = np.asarray(w, np.float32)
    check_shape(*w.shape)
    s, z = per_channel_params(w, lo, hi)
    return per_channel_format(per_channel_codes(w, s, z), s, z)


def progressive_level1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level 1 of the progressive format: (s1 fp16 [N], w1 = clamp(W / s1, -P, P) float32)."""
    w = np.asarray(w, np.float32)
    s1 = (np.abs(w).max(axis=1) / PROTECTIVE_RANGE).astype(np.float16)
    s1 = np.where(s1 == 0, np.float16(1.0), s1)
    w1 = np.clip(w / s1.astype(np.float32)[:, None], -PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    return s1, w1


def group_params(w: np.ndarray, group_size: int = 128, lo: np.ndarray | None = None,
                 hi: np.ndarray | None = None, ratio: np.ndarray | float | None = None):
    """Progressive parameters of W [N, K]: (s1 fp16 [N], w1 float32 [N, K], s2 [N, K/g] and
    zero [N, K/g] as float32 integers, g). lo/hi [N, K/g]: per-group ranges in W's units;
    ratio (a scalar or [N, K/g], instead of lo/hi): each group's own range shrunk by it (the
    clipping search's candidates, quant/clipping.py)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    check_shape(n, k)
    g = group_size_for(k, group_size)
    s1, w1 = progressive_level1(w)
    w1g = w1.reshape(n, k // g, g)
    s1f = s1.astype(np.float32)[:, None]
    glo = w1g.min(axis=2) if lo is None else np.asarray(lo, np.float32) / s1f
    ghi = w1g.max(axis=2) if hi is None else np.asarray(hi, np.float32) / s1f
    glo, ghi = np.minimum(glo, 0.0), np.maximum(ghi, 0.0)
    if ratio is not None:
        if lo is not None or hi is not None:
            raise ValueError("give either lo/hi or ratio, not both")
        glo, ghi = glo * np.float32(ratio), ghi * np.float32(ratio)
    glo = np.clip(glo, -PROTECTIVE_RANGE, 0.0)
    ghi = np.clip(ghi, 0.0, PROTECTIVE_RANGE)
    s2 = np.clip(np.rint((ghi - glo) / 15.0), 1, 127).astype(np.float32)
    z = np.clip(np.rint(-glo / s2), 0, 15).astype(np.float32)
    return s1, w1, s2, z, g


def group_codes(w1: np.ndarray, s2: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Codes of level-1 values w1 (same shape as s2 and z, one entry per weight)."""
    return np.clip(np.rint(w1 / s2) + z, 0, 15)


def group_format(q: np.ndarray, s1: np.ndarray, s2: np.ndarray, z: np.ndarray,
                 g: int) -> W4Group:
    """Assemble W4Group from codes [N, K], s1 [N], integer s2 and z [N, K/g]."""
    n, k = q.shape
    w8 = (q.reshape(n, k // g, g) - z[..., None]) * s2[..., None]
    if np.abs(w8).max(initial=0) > 127:  # cannot happen with P = 119; a guard on the format
        raise FormatError("progressive quantization left the INT8 range")
    return W4Group(pack_uint4(q), s1, s2.T.astype(np.int8), (z * s2).T.astype(np.uint8), g)


def quantize_group(w: np.ndarray, group_size: int = 128, lo: np.ndarray | None = None,
                   hi: np.ndarray | None = None, ratio: np.ndarray | float | None = None
                   ) -> W4Group:
    """W [N, K] float -> W4Group (progressive). lo/hi [N, K/g]: per-group ranges in W's units;
    or ratio: each group's range shrunk by it (see group_params).

    group_size 128 falls back to 64 where K is not a multiple of 128 (see group_size_for).
    """
    s1, w1, s2, z, g = group_params(w, group_size, lo, hi, ratio)
    n, k = w1.shape
    q = group_codes(w1, np.repeat(s2, g, axis=1), np.repeat(z, g, axis=1))
    return group_format(q, s1, s2, z, g)


def codes(fmt: W4PerChannel | W4Group) -> np.ndarray:
    return unpack_uint4(np.asarray(fmt.qweight))


def int8_level(fmt: W4Group) -> np.ndarray:
    """The exact INT8 weights w8 = q * s2 - szero [N, K] (int8) that the GEMM multiplies."""
    q = codes(fmt).astype(np.int32)
    n, k = q.shape
    g = fmt.group_size
    s2 = np.asarray(fmt.s2, np.int32).T  # [N, K/g]
    sz = np.asarray(fmt.szero, np.int32).T
    w8 = q.reshape(n, k // g, g) * s2[..., None] - sz[..., None]
    return w8.reshape(n, k).astype(np.int8)


def dequantize(fmt: W4PerChannel | W4Group) -> np.ndarray:
    """The float32 weights [N, K] the format represents."""
    if isinstance(fmt, W4Group):
        return int8_level(fmt).astype(np.float32) * np.asarray(fmt.s1, np.float32)[:, None]
    q = codes(fmt).astype(np.float32)
    return (q * np.asarray(fmt.scale, np.float32)[:, None]
            - np.asarray(fmt.szero, np.float32)[:, None])


def unpack_uint4_jnp(qweight: jax.Array) -> jax.Array:
    """uint8 [..., N, K/2] -> int32 codes [..., N, K] in jnp (jit-able); as unpack_uint4."""
    *lead, k2 = qweight.shape
    c = qweight.astype(jnp.int32).reshape(*lead, k2 // HALF, 1, HALF)
    return jnp.concatenate([c & 0xF, c >> 4], axis=-2).reshape(*lead, 2 * k2)


def to_int8(w: W4PerChannel | W4Group) -> W4Int8:
    """A packed W4 weight -> W4Int8, the GEMM's INT8 operand unpacked once (pure jnp, jit-able;
    leading axes, e.g. the stacked layers' [L, ...], are kept). Exact: the same integers the
    GEMM multiplies, the same scales."""
    if isinstance(w, W4Int8):
        return w
    if not isinstance(w, (W4PerChannel, W4Group)):
        raise TypeError(f"to_int8 takes W4PerChannel or W4Group, not {type(w).__name__}")
    q = unpack_uint4_jnp(jnp.asarray(w.qweight))
    if isinstance(w, W4PerChannel):
        return W4Int8(q.astype(jnp.int8), w.scale, w.szero)
    *lead, n, k = q.shape
    g = w.group_size
    s2 = jnp.swapaxes(jnp.asarray(w.s2).astype(jnp.int32), -1, -2)[..., None]  # [..., N, K/g, 1]
    sz = jnp.swapaxes(jnp.asarray(w.szero).astype(jnp.int32), -1, -2)[..., None]
    w8 = q.reshape(*lead, n, k // g, g) * s2 - sz
    return W4Int8(w8.reshape(*lead, n, k).astype(jnp.int8), w.s1, None)
