"""The pass over 8-bit blockwise state (`.storage.BLOCKWISE8`), which `.dense.flat` runs
for that codec: each block of 256 elements is dequantised, stepped and requantised in one
pass.

Each state array is a uint8 array of `extent(n)` bytes (whole 260-byte blocks: 256 codes
and the block's scale), over float32 params. For each block, in float32:

    v, m, b  = MAP[code] * scale              (square_avg on UNSIGNED8, the others on SIGNED8)
    p, v, m, b = element(p, g, v, m, b)       the same per-element update as every shell
    scale'   = max |v| over the block, code' = the map's entry nearest v / scale'
                                              (likewise m and b, each with its own scale)

so the param is updated from the unrounded state, and only what is kept is rounded (as
with bfloat16 state). A block is one thread's: the threads split the blocks (`TILE` at a
time, `tile`), so the bits do not depend on the thread count. This module holds the step of
a tile of blocks, the block's scale and its requantisation (in pieces the CUDA kernel of
`.cuda` shares: `magnitude`, `scaling`, `code_of`, `store_scale`).
"""

import numpy as np
from numba import njit

from ._jit import name
from .element import element
from .storage import BLOCK8, BLOCK8_BYTES, NATIVE, SIGNED8, UNSIGNED8, grad_suffix, signed8_code, suffix, unsigned8_code

#: Blocks a thread steps with one scratch buffer (its allocation amortised over them).
TILE = 16


@njit(inline="always")
def scale_of(a, at):
    """The float32 scale of the block at byte `at` of `a` (little-endian, after its codes)."""
    u32 = np.uint32
    o = at + BLOCK8
    bits = u32(a[o]) | u32(u32(a[o + 1]) << u32(8)) | u32(u32(a[o + 2]) << u32(16)) | u32(u32(a[o + 3]) << u32(24))
    return u32(bits).view(np.float32)


@njit(inline="always")
def magnitude(x):
    """The bits of |x| (float32) as a block's scale takes them: an infinity counts as 0 (it
    saturates to the scale), a NaN above every number (the scale is NaN then)."""
    u32 = np.uint32
    bits = u32(np.float32(x).view(u32) & u32(0x7FFFFFFF))
    return u32(0) if bits == u32(0x7F800000) else bits


@njit(inline="always")
def scaling(top):
    """`(pre, inv)` of a block whose largest magnitude has the bits `top`: each value is
    coded as `(value * pre) * inv` on the map. A subnormal scale: values and scale are taken
    2^64 up first (exact), so `1 / scale` is finite; a zero scale codes every value from 0."""
    u32 = np.uint32
    scale = u32(top).view(np.float32)
    pre = np.float32(18446744073709551616.0) if top < u32(0x00800000) else np.float32(1.0)
    inv = np.float32(1.0) / np.float32(scale * pre) if scale > np.float32(0.0) else np.float32(0.0)
    return pre, inv


@njit(inline="always")
def code_of(x, pre, inv, signed):
    """The code of value `x` in a block coded with `scaling`'s `(pre, inv)`."""
    y = np.float32(x * pre) * inv
    return signed8_code(y) if signed else unsigned8_code(y)


@njit(inline="always")
def store_scale(a, at, top):
    """Write the scale bits `top` after the codes of the block at byte `at` of `a`
    (little-endian), as `scale_of` reads them."""
    u32 = np.uint32
    o = at + BLOCK8
    a[o] = np.uint8(top & u32(0xFF))
    a[o + 1] = np.uint8(u32(top >> u32(8)) & u32(0xFF))
    a[o + 2] = np.uint8(u32(top >> u32(16)) & u32(0xFF))
    a[o + 3] = np.uint8(top >> u32(24))


@njit(inline="always")
def requantise(values, count, a, at, signed):
    """Store `values[:count]` (float32) as the block at byte `at` of `a`: its scale, the
    bits' maximum of the finite |value| (NaN if any is NaN, `magnitude`), and each value's
    code on the map (`.storage`; an infinite value saturates to the scale)."""
    top = np.uint32(0)
    for j in range(count):
        bits = magnitude(values[j])
        top = bits if bits > top else top
    pre, inv = scaling(top)
    for j in range(count):
        a[at + j] = code_of(values[j], pre, inv, signed)
    store_scale(a, at, top)


_TILES: dict = {}


def tile(key, grads=NATIVE, copy=None):
    """The `inline="always"` step of one tile of 8-bit blocks, for variant `key`, its grads
    read as `grads` says, with `copy` each param's copy written too: `step_tile(t, blocks, n,
    param, grad, square_avg, grad_avg, momentum_buffer, copy_out, k)` steps blocks
    `t * TILE` to `(t + 1) * TILE` (of `blocks` over `n` params), `k` the element
    function's constants. The flat shell's parallel loop calls it once per tile."""
    tag = (key, grads.tag, None if copy is None else copy.tag)
    fn = _TILES.get(tag)
    if fn is None:
        fn = _TILES[tag] = _make_tile(key, grads, copy)
    return fn


def _make_tile(key, grads, copy):
    update, read = element(key), grads.load
    uses_m, uses_b, has_copy = key.uses_grad_avg, key.uses_momentum_buffer, copy is not None
    low = copy if has_copy else NATIVE
    encode, load, reseed = low.encode, low.load, low.reseed
    unsigned, signed = UNSIGNED8, SIGNED8

    def step_tile(t, blocks, n, param, grad, square_avg, grad_avg, momentum_buffer, copy_out, k):
        zero = k[11]
        vs = np.empty(BLOCK8, np.float32)
        ms = np.empty(BLOCK8 if uses_m else 0, np.float32)
        bs = np.empty(BLOCK8 if uses_b else 0, np.float32)
        for blk in range(t * TILE, min(blocks, (t + 1) * TILE)):
            # the block's slices: the loop over them vectorises (indexing the whole arrays at
            # base + j, nested in the tile loop, did not: 8x slower)
            base, at = blk * BLOCK8, blk * BLOCK8_BYTES
            stop = min(n, base + BLOCK8)
            count = stop - base
            ps, gs = param[base:stop], grad[base:stop]
            cs = copy_out[base:stop] if has_copy else ps
            vq = square_avg[at : at + BLOCK8_BYTES]
            mq = grad_avg[at : at + BLOCK8_BYTES] if uses_m else grad_avg
            bq = momentum_buffer[at : at + BLOCK8_BYTES] if uses_b else momentum_buffer
            v_scale = scale_of(vq, 0)
            m_scale = scale_of(mq, 0) if uses_m else zero
            b_scale = scale_of(bq, 0) if uses_b else zero
            for j in range(count):
                m = signed[mq[j]] * m_scale if uses_m else zero
                b = signed[bq[j]] * b_scale if uses_b else zero
                p = ps[j]
                if reseed:  # a 16-bit param written since the last step: its value is the master's now
                    p = load(cs, j) if cs[j] != encode(p) else p
                p, v, m, b = update(p, read(gs, j), unsigned[vq[j]] * v_scale, m, b, k)
                ps[j] = p
                if has_copy:
                    cs[j] = encode(p)
                vs[j] = v
                if uses_m:
                    ms[j] = m
                if uses_b:
                    bs[j] = b
            requantise(vs, count, vq, 0, False)
            if uses_m:
                requantise(ms, count, mq, 0, True)
            if uses_b:
                requantise(bs, count, bq, 0, True)

    kind = f"_copy{suffix(copy)}" if has_copy else ""
    name(step_tile, f"blockwise_tile_{key.tag}{kind}{grad_suffix(grads)}")
    return njit(inline="always")(step_tile)
