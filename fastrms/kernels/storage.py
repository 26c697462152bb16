"""How the loop shells read and write the optimizer state: a codec, chosen at compile time.

The element function computes in the params' dtype `T`. Each state array (`square_avg`,
`grad_avg`, `momentum_buffer`) is read through the codec's `load(a, i) -> T` and written as
`a[i] = encode(x)`, both `inline="always"`, so the native codec compiles to the plain
`a[i]` / `a[i] = x` it replaces (the same machine code, the same bits) and a state of
another storage is a new codec here, not a new shell. (The shell does the store itself: a
store inside an inlined function that takes the array stopped LLVM vectorising the loop,
the conversion in a value-returning one does not.)

- `NATIVE`: the state in the params' own dtype (float32 or float64), the default;
- `BFLOAT16`: the state as bfloat16 bit patterns in uint16 arrays (half the bytes of
  float32), for float32 params: `load` widens exactly (`bits << 16`), `encode` rounds to
  nearest, ties to even, and keeps a NaN a (quiet) NaN, as `ml_dtypes.bfloat16` and torch
  round:

      bits(x) = float32 bits of x
      encode  = (bits(x) + 0x7fff + ((bits(x) >> 16) & 1)) >> 16    (x not NaN)
              = (bits(x) >> 16) | 0x0040                            (x NaN)

`fastrms.reference.bfloat16_round` writes the same rounding in NumPy.

The same codecs read and write the other 16-bit arrays of a float32 step (`ARRAYS`):
grads handed in as bfloat16 or float16 (`load`, exact) and the params' low-precision copy
(`encode`). `FLOAT16` is IEEE binary16 as bits in uint16, converted with integer and float32
code that vectorises (Numba has no float16 on the CPU; F. Giesen's conversions):

    load    exact: normal, subnormal, zero, inf and NaN (payload kept)
    encode  round to nearest, ties to even; beyond 65504 (from 65520 up) inf; a NaN stays a
            (quiet) NaN with its payload's top bits, as NumPy's `astype(np.float16)` keeps it

`fastrms.reference` checks `FLOAT16` against NumPy's own float16, bit for bit.
"""

from typing import Any, NamedTuple

import numpy as np
from numba import njit


class Codec(NamedTuple):
    """One state storage: `tag` (in the compiled functions' names; `""` for the native
    one), the storage `dtype` (None: the params' own), the params' dtypes it serves (None:
    any float), its inline `load(a, i)` and `encode(x)` (the value to store), and
    `witness(params_witness)`: an empty array of the storage dtype, which types the
    pointer-table shells' state arrays; `extent(n)`: the storage elements that hold `n`
    values (`n`, or whole blocks for `BLOCKWISE8`), so element `start` of a chunk that
    starts on a block is at `extent(start)`; `block`: 0 for an element-wise codec, else
    the elements a block's scale covers (`load` and `encode` then are None: the shells of
    `.blockwise` read and write whole blocks); `reseed`, for the copy that is a 16-bit param
    kept with a float32 master (`MASTERS`): a copy element that is not the master's rounding
    (written from outside since the last step) becomes the master before the step,
    `p = load(copy) if copy != encode(p) else p`."""

    tag: str
    dtype: Any
    params: Any
    load: Any
    encode: Any
    witness: Any
    extent: Any = None
    block: int = 0
    reseed: bool = False


@njit(inline="always")
def _native_load(a, i):
    return a[i]


@njit(inline="always")
def _native_encode(x):
    return x


@njit(inline="always")
def _native_witness(witness):
    return witness


_BF16_WITNESS = np.empty(0, np.uint16)


@njit(inline="always")
def _bf16_witness(witness):
    return _BF16_WITNESS


@njit(inline="always")
def _bf16_load(a, i):
    return np.uint32(np.uint32(a[i]) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def bfloat16_bits(x):
    """float32 `x` as bfloat16 bits (uint16): nearest, ties to even; a NaN stays a (quiet) NaN.
    (Each integer step is wrapped in uint32, as in `float16_bits`: no 64-bit lanes; only a
    NaN's bits can wrap, and its result is not the one kept.)"""
    u32 = np.uint32
    u = np.float32(x).view(u32)
    nearest = u32(u32(u + u32(u32(0x7FFF) + u32(u32(u >> u32(16)) & u32(1)))) >> u32(16))
    truncated = u32(u32(u >> u32(16)) | u32(0x0040))  # NaN: keep it a NaN, whatever its payload
    return np.uint16(truncated if x != x else nearest)


@njit(inline="always")
def _f16_load(a, i):
    u32 = np.uint32
    h = u32(a[i])
    o = u32(u32(h & u32(0x7FFF)) << u32(13))  # exponent and mantissa, in float32's place
    e = u32(o & u32(0x0F800000))
    o = u32(o + u32(112 << 23))  # rebias the exponent: 15 -> 127
    # zero and subnormals: exact through one float32 subtraction (2^-14 * 0.mantissa)
    tiny = np.float32(u32(o + u32(1 << 23)).view(np.float32) - np.float32(6.103515625e-05)).view(u32)
    o = u32(o + u32(112 << 23)) if e == u32(0x0F800000) else (tiny if e == u32(0) else o)  # inf, NaN: exponent 255
    return u32(o | u32(u32(h & u32(0x8000)) << u32(16))).view(np.float32)


@njit(inline="always")
def float16_bits(x):
    """float32 `x` as IEEE float16 bits (uint16): nearest, ties to even; inf beyond 65504; a
    NaN stays a (quiet) NaN. (Every integer step is wrapped in uint32: Numba widens integer
    arithmetic to 64 bits, which halves the lanes of the vector loop.)"""
    u32 = np.uint32
    u = np.float32(x).view(u32)
    sign = u32(u32(u >> u32(16)) & u32(0x8000))
    a = u32(u & u32(0x7FFFFFFF))
    # subnormal results (|x| < 2^-14): the float32 sum with 0.5 rounds the mantissa in place
    low = u32(np.float32(u32(a).view(np.float32) + np.float32(0.5)).view(u32) - u32(0x3F000000))
    odd = u32(u32(a >> u32(13)) & u32(1))
    normal = u32(u32(u32(a - u32(0x38000000)) + u32(u32(0x0FFF) + odd)) >> u32(13))
    nan = u32(u32(0x7E00) | u32(u32(a >> u32(13)) & u32(0x03FF)))
    big = nan if a > u32(0x7F800000) else u32(0x7C00)
    h = big if a >= u32(0x47800000) else (normal if a >= u32(0x38800000) else low)
    return np.uint16(h | sign)


@njit(inline="always")
def mix32(h):
    """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on
    every input bit (integer multiplies and shifts, which vectorise)."""
    u32 = np.uint32
    h = u32(h)
    h = u32(h ^ u32(h >> u32(16)))
    h = u32(h * u32(0x85EBCA6B))
    h = u32(h ^ u32(h >> u32(13)))
    h = u32(h * u32(0xC2B2AE35))
    return u32(h ^ u32(h >> u32(16)))


@njit(inline="always")
def stochastic_noise(key, index):
    """The 32 random bits of element `index` under `key` (one array's, one step's):
    `mix32(index * 0x9E3779B9 ^ key)`, a counter-based hash, so any thread and any chunking
    draws the same bits for the same element."""
    u32 = np.uint32
    return mix32(u32(u32(u32(index) * u32(0x9E3779B9)) ^ u32(key)))


@njit(inline="always")
def bfloat16_stochastic_bits(x, r):
    """float32 `x` as bfloat16 bits (uint16), rounded stochastically with the random bits
    `r`: up (away from zero) with probability (the 16 bits dropped) / 2^16, so the rounded
    value is `x` on average (torchao's `bf16_stochastic_round`); from the largest finite
    bfloat16 it may round to inf, as a float32 that large may; a NaN stays a (quiet) NaN."""
    u32 = np.uint32
    u = np.float32(x).view(u32)
    rounded = u32(u32(u + u32(u32(r) & u32(0xFFFF))) >> u32(16))
    truncated = u32(u32(u >> u32(16)) | u32(0x0040))
    return np.uint16(truncated if x != x else rounded)


@njit(inline="always")
def _same_extent(n):
    return n


# ------------------------------------------------------------------ 8-bit blockwise state
#
# A state array of n values is kept as ceil(n / 256) blocks of 260 bytes: 256 one-byte
# codes, then the block's scale, a float32 in little-endian byte order (so the buffer is
# the same on any machine). Value i is `MAP[code] * scale` of its block; a block is
# encoded from its float32 values x as
#
#     scale = max |x|            over the block's finite x (their bits' maximum; NaN if
#                                any x is NaN): finite for finite inputs, so one square
#                                that overflows (v = inf, from a grad beyond 2^64) does
#                                not stop its 255 neighbours; an infinite x saturates to
#                                +-scale
#     y     = (x * p) * inv      p = 2^64 when scale is subnormal (exact), else 1;
#                                inv = 1 / (scale * p) (float32), or 0 when scale is 0 or NaN
#     code  = the map entry nearest y: the number of MIDPOINTS below y for UNSIGNED8 (a
#             tie goes to the lower code), and for SIGNED8 the sign's half and the
#             magnitude nearest |y| (a tie goes to the smaller magnitude); a NaN y gets the
#             last code
#
# with MIDPOINTS[c] = (MAP[c] + MAP[c + 1]) * 0.5 in float32. Two maps, each of 256 entries:
#
#   UNSIGNED8 (square_avg, v >= 0):  MAP[c] = 2^((c - 255) / 8): 8 codes an octave from
#       2^-31.875 to 1, no zero. Every value is kept to within 4.4% of itself down to
#       2^-31.875 of its block's largest (or to the subnormal spacing 2^-149, in a block
#       whose largest is subnormal), and a small v is never stored as 0: a zero code
#       would make a later 1/sqrt(v) blow up (torchao's finding for 4-bit Adam), and
#       relative precision is what sqrt(v) needs.
#   SIGNED8 (grad_avg, momentum_buffer):  MAP[c] = -2^((127 - c) / 4) for c < 128 and
#       2^((c - 255) / 4) from 128: 4 codes an octave, each sign from 2^-31.75 to 1
#       (within 9.1% of itself); 0 is kept as the smallest positive code (2^-31.75 of the
#       block's largest, or 0 in an all-zero block).
#
# Both maps step by a fixed ratio, so the shells compute a code from y's exponent and a
# few compares of its mantissa (no search); `fastrms.reference` encodes with
# `np.searchsorted` over the midpoints, and the two agree bit for bit.

#: Bytes a block of 8-bit state takes (`BLOCK8` codes and a float32 scale).
BLOCK8, BLOCK8_BYTES = 256, 260


def _octave_map(per_octave, count):
    """`count` float32 values 2^(-k / per_octave), k = count - 1 .. 0, ascending, each
    exactly a power of two times one of the octave's `per_octave` mantissas."""
    mantissas = np.exp2(np.arange(per_octave) / per_octave).astype(np.float32)
    q = np.arange(count) - (count - 1)  # -(count - 1) .. 0
    return np.ldexp(mantissas[q % per_octave], q // per_octave).astype(np.float32)


def _thresholds(per_octave):
    """The midpoints between an octave's mantissas and the next (the next octave's first
    is 2), in float32: the compares that find a code."""
    m = np.append(np.exp2(np.arange(per_octave) / per_octave).astype(np.float32), np.float32(2.0))
    return ((m[:-1] + m[1:]) * np.float32(0.5)).astype(np.float32)


UNSIGNED8 = _octave_map(8, 256)
SIGNED8 = np.concatenate((-_octave_map(4, 128)[::-1], _octave_map(4, 128))).astype(np.float32)
for _m in (UNSIGNED8, SIGNED8):
    _m.setflags(write=False)
_T8 = tuple(float(t) for t in _thresholds(8))
_T4 = tuple(float(t) for t in _thresholds(4))


def midpoints(table):
    """A map's midpoints, in float32 (see above)."""
    return ((table[:-1] + table[1:]) * np.float32(0.5)).astype(np.float32)


@njit(inline="always")
def _octave_code(y, top, per_octave, shift, t0, t1, t2, t3, t4, t5, t6, t7):
    """The index in a map of `top + 1` entries, `per_octave` an octave below 1, of the
    entry nearest |y| (see above): `top + per_octave * exponent(y) + (mantissa compares)`,
    clamped to [0, top]. The thresholds past `per_octave` are 3.0 (never below a mantissa)."""
    u32 = np.uint32
    a = u32(np.float32(y).view(u32) & u32(0x7FFFFFFF))
    e = np.int32(a >> u32(23)) - np.int32(127)
    m = u32(u32(a & u32(0x007FFFFF)) | u32(0x3F800000)).view(np.float32)
    f32 = np.float32
    sub = np.int32(
        np.int32(f32(t0) < m) + np.int32(f32(t1) < m) + np.int32(f32(t2) < m) + np.int32(f32(t3) < m)
        + np.int32(f32(t4) < m) + np.int32(f32(t5) < m) + np.int32(f32(t6) < m) + np.int32(f32(t7) < m)
    )  # fmt: skip
    c = np.int32(np.int32(top) + np.int32(e << np.int32(shift)) + sub)
    c = np.int32(top) if a > u32(0x7F800000) else c  # NaN: the last code
    return np.int32(0) if c < np.int32(0) else (np.int32(top) if c > np.int32(top) else c)


@njit(inline="always")
def unsigned8_code(y):
    """The `UNSIGNED8` code of a normalised value `y` (`y <= 1`; see above)."""
    return np.uint8(_octave_code(y, 255, 8, 3, _T8[0], _T8[1], _T8[2], _T8[3], _T8[4], _T8[5], _T8[6], _T8[7]))


@njit(inline="always")
def signed8_code(y):
    """The `SIGNED8` code of a normalised value `y` (`|y| <= 1`; see above): the magnitude's
    index k on the positive half, 128 + k, or 127 - k when y < 0."""
    k = _octave_code(y, 127, 4, 2, _T4[0], _T4[1], _T4[2], _T4[3], 3.0, 3.0, 3.0, 3.0)
    return np.uint8(np.int32(127) - k if y < np.float32(0.0) else np.int32(128) + k)


@njit(inline="always")
def _block_extent(n):
    return ((n + 255) >> 8) * 260


_U8_WITNESS = np.empty(0, np.uint8)


@njit(inline="always")
def _u8_witness(witness):
    return _U8_WITNESS


NATIVE = Codec("", None, None, _native_load, _native_encode, _native_witness, _same_extent)
BFLOAT16 = Codec("bf16", np.dtype(np.uint16), (np.dtype(np.float32),), _bf16_load, bfloat16_bits, _bf16_witness,
                 _same_extent)  # fmt: skip
FLOAT16 = Codec("f16", np.dtype(np.uint16), (np.dtype(np.float32),), _f16_load, float16_bits, _bf16_witness,
                _same_extent)  # fmt: skip
#: 8-bit blockwise state (see above): `square_avg` on `UNSIGNED8`, the others on `SIGNED8`.
BLOCKWISE8 = Codec("q8", np.dtype(np.uint8), (np.dtype(np.float32),), None, None, _u8_witness, _block_extent,
                   BLOCK8)  # fmt: skip

#: Every state codec by name (the `state_storage` a front end names).
CODECS = {"native": NATIVE, "bfloat16": BFLOAT16, "8bit": BLOCKWISE8}
#: The codecs of a float32 step's 16-bit arrays (low-precision grads and copies), by the
#: NumPy dtype name they hold (`ml_dtypes.bfloat16`'s is "bfloat16").
ARRAYS = {"bfloat16": BFLOAT16, "float16": FLOAT16}
#: The copy codecs of 16-bit params with float32 masters (`Codec.reseed`), by their plain codec's tag.
MASTERS = {c.tag: c._replace(tag=f"{c.tag}m", reseed=True) for c in ARRAYS.values()}


def _mix32(h):
    """`mix32` in Python integers."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def stochastic_key(seed, ident, step):
    """The noise key (a uint32, as a Python int) of array `ident` at step `step` (1-based)
    under `seed` (any int): `mix32(mix32(seed32 ^ mix32(ident)) ^ step)`, with `seed32` the
    seed's two 32-bit halves xored. A step's rounding depends only on these three and the
    element's index: a run resumed from a checkpoint draws the same bits."""
    return step_key(stochastic_base(seed, ident), step)


def stochastic_base(seed, ident):
    """The part of `stochastic_key` that does not change from step to step."""
    seed32 = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return _mix32(seed32 ^ _mix32(ident))


def step_key(base, step):
    """`stochastic_key` from its `stochastic_base` and the step."""
    return _mix32(base ^ (step & 0xFFFFFFFF))


def state_dtype(codec, param_dtype):
    """The dtype of the state arrays `codec` keeps for params of `param_dtype`."""
    return np.dtype(param_dtype) if codec.dtype is None else codec.dtype


def extent(codec, n):
    """The storage elements that hold `n` values (`codec.extent` in Python)."""
    return -(-n // BLOCK8) * BLOCK8_BYTES if codec.block else n


def encode(codec, param_dtype, x):
    """The stored form of the value `x` (a Python or NumPy float) for params of
    `param_dtype`: `x` in that dtype (native), or its bfloat16 bit pattern, rounded as
    the kernels round (`BFLOAT16`). Element-wise codecs only (`fill` fills any)."""
    value = np.asarray(x, dtype=param_dtype if codec.dtype is None else np.float32)
    return value if codec is NATIVE else codec.encode(value[()])


def fill(codec, stored, param_dtype, x):
    """Fill the storage array `stored` (whole blocks for `BLOCKWISE8`) with the value `x`:
    every block's scale |x| and every code the map's 1 (or -1), so each value decodes to
    `x` exactly (x >= 0 for `UNSIGNED8`; only `square_avg` is ever filled with a non-zero)."""
    if not codec.block:
        stored[...] = encode(codec, param_dtype, x)
        return
    x = np.float32(x)
    blocks = stored.reshape(-1, BLOCK8_BYTES)
    blocks[:, :BLOCK8] = 255 if x >= 0 else 0
    blocks[:, BLOCK8:] = np.frombuffer(np.abs(x).astype("<f4").tobytes(), np.uint8)


def block_parts(stored, n):
    """`(codes, scales)` of an 8-bit blockwise storage array holding `n` values: the `n`
    codes (uint8) and the blocks' scales (float32), as copies."""
    blocks = np.asarray(stored, np.uint8).reshape(-1, BLOCK8_BYTES)
    codes = blocks[:, :BLOCK8].reshape(-1)[:n].copy()
    scales = np.ascontiguousarray(blocks[:, BLOCK8:]).view("<f4").reshape(-1).astype(np.float32)
    return codes, scales


def decode(codec, stored, n=None, signed=False):
    """The values a state array `stored` holds, as NumPy arrays: itself (native), the
    float32 values of its bfloat16 bit patterns (exact), or of its `n` 8-bit codes
    (`MAP[code] * scale`, `SIGNED8` with `signed`, else `UNSIGNED8`)."""
    if codec is NATIVE:
        return stored
    if codec.block:
        codes, scales = block_parts(stored, stored.size // BLOCK8_BYTES * BLOCK8 if n is None else n)
        table = SIGNED8 if signed else UNSIGNED8
        return table[codes] * np.repeat(scales, BLOCK8)[: codes.size]
    return (np.asarray(stored, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def suffix(codec):
    """What `codec` adds to a compiled function's name (nothing for the native one)."""
    return f"_{codec.tag}" if codec.tag else ""


def grad_suffix(grads):
    """What a grads codec adds to a compiled function's name (nothing for the native one)."""
    return f"_g{grads.tag}" if grads.tag else ""
