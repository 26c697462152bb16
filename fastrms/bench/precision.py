"""`fastrms bench --precision`: each state storage of `fastrms.RMSprop` (float32 params),
the float32 master step that writes a bfloat16 copy of the params (`copy_to`), and the
master step of a 16-bit model (its bfloat16 or float16 grads read, its copy written in the
same pass: offloaded training's step), each against its own limit, and the modes against
each other, in one process.

For a mode the limit is the slower of two kernels, as for every variant (`fastrms.bench.peers`):

- the traffic kernel: reads and writes exactly the bytes the mode's step moves (param and
  grad in float32, the state in its storage) with no arithmetic;
- the bespoke loop: the mode's formula with its constants folded in (for bfloat16 state:
  load the bits, widen, update in float32, round to nearest even and store the bits).

Bytes a plain step moves per parameter: native state 20 (read p, g, v; write p, v, each
4 bytes), bfloat16 state 16 (v is 2 bytes each way), 8-bit state 14.03 (v is 260 bytes a
block of 256 each way), the master step with its copy 22 (the bf16 copy written, 2 bytes), a
16-bit model's master step 20 (its grad read in 2 bytes, its copy written in 2). State
bytes per parameter: 4, 2, 1.02, 4 and 4 (the float32 master is the param the step updates;
the model's 16-bit weights are its copy).

With bitsandbytes installed (and torch), the 8-bit mode is also timed against its
`RMSprop8bit` on float32 tensors of the same size and hyperparameters (`"8bit",
"bitsandbytes"`): its blockwise 8-bit `square_avg` on the CPU.
"""

import numpy as np
from numba import njit, prange

from .. import kernels
from ..kernels.blockwise import requantise, scale_of
from ..kernels.storage import BFLOAT16, BLOCK8, BLOCK8_BYTES, FLOAT16, UNSIGNED8, bfloat16_bits
from ..optimizer import RMSprop
from .peers import DEFAULT_HYPER, Problem, setup
from .timing import measure_calls

#: The modes measured, with the bytes a plain step moves and the state keeps per parameter.
MODES = {
    "native": (20, 4),
    "bfloat16": (16, 2),
    "8bit": (12 + 2 * BLOCK8_BYTES / BLOCK8, BLOCK8_BYTES / BLOCK8),
    "bf16 copy": (22, 4),
    "bf16 master": (20, 4),
    "f16 master": (20, 4),
}
#: The 16-bit model modes: the codec of their grads and copies.
MASTERS = {"bf16 master": BFLOAT16, "f16 master": FLOAT16}


def _make_bf16_bespoke(lr, beta, eps, parallel):
    omb = 1.0 - beta

    def plain_bf16(p, g, v):
        for i in prange(p.size):
            gi = g[i]
            vi = np.float32(beta) * np.uint32(np.uint32(v[i]) << np.uint32(16)).view(np.float32) + np.float32(omb) * (
                gi * gi
            )
            v[i] = bfloat16_bits(vi)
            p[i] = p[i] - np.float32(lr) * (gi / (np.sqrt(vi) + np.float32(eps)))

    plain_bf16.__name__ = plain_bf16.__qualname__ = f"bespoke_plain_bf16_{'parallel' if parallel else 'serial'}"
    return njit(parallel=parallel, error_model="numpy", nogil=True)(plain_bf16)


def _make_copy_bespoke(lr, beta, eps, parallel):
    omb = 1.0 - beta

    def plain_copy(p, g, v, c):
        for i in prange(p.size):
            gi = g[i]
            vi = np.float32(beta) * v[i] + np.float32(omb) * (gi * gi)
            v[i] = vi
            pi = p[i] - np.float32(lr) * (gi / (np.sqrt(vi) + np.float32(eps)))
            p[i] = pi
            c[i] = bfloat16_bits(pi)

    plain_copy.__name__ = plain_copy.__qualname__ = f"bespoke_plain_copy_{'parallel' if parallel else 'serial'}"
    return njit(parallel=parallel, error_model="numpy", nogil=True)(plain_copy)


def _make_copy_traffic(parallel):
    """Loads p, g and v, stores p, v and the uint16 copy, with no arithmetic."""

    def traffic_copy(p, g, v, c):
        for i in prange(p.size):
            old = v[i]
            v[i] = p[i]
            c[i] = np.uint16(np.float32(old).view(np.uint32) >> np.uint32(16))
            p[i] = max(g[i], old)
        return parallel

    traffic_copy.__name__ = traffic_copy.__qualname__ = f"traffic_copy_{'parallel' if parallel else 'serial'}"
    return kernels.jit(parallel)(traffic_copy)


def _make_bf16_traffic(parallel):
    """Loads p, g and the uint16 state, stores p and the state, with no arithmetic: the
    values rotate, one `max` keeps every load live."""

    def traffic_bf16(p, g, v):
        for i in prange(p.size):
            old = v[i]
            v[i] = np.uint16(np.float32(p[i]).view(np.uint32) >> np.uint32(16))
            p[i] = max(g[i], np.uint32(np.uint32(old) << np.uint32(16)).view(np.float32))
        return parallel

    traffic_bf16.__name__ = traffic_bf16.__qualname__ = f"traffic_bf16_{'parallel' if parallel else 'serial'}"
    return kernels.jit(parallel)(traffic_bf16)


def _make_master_bespoke(lr, beta, eps, parallel, codec):
    """The plain step of a 16-bit model's float32 master: the grad widened from its bits, the
    copy rounded to its bits."""
    omb = 1.0 - beta
    load, encode = codec.load, codec.encode

    def plain_master(p, g, v, c):
        for i in prange(p.size):
            gi = load(g, i)
            vi = np.float32(beta) * v[i] + np.float32(omb) * (gi * gi)
            v[i] = vi
            pi = p[i] - np.float32(lr) * (gi / (np.sqrt(vi) + np.float32(eps)))
            p[i] = pi
            c[i] = encode(pi)

    kind = f"{codec.tag}_{'parallel' if parallel else 'serial'}"
    plain_master.__name__ = plain_master.__qualname__ = f"bespoke_plain_master_{kind}"
    return njit(parallel=parallel, error_model="numpy", nogil=True)(plain_master)


def _make_master_traffic(parallel):
    """Loads p, the uint16 grad and v, stores p, v and the uint16 copy, with no arithmetic."""

    def traffic_master(p, g, v, c):
        for i in prange(p.size):
            old = v[i]
            v[i] = p[i]
            c[i] = g[i]
            p[i] = old
        return parallel

    traffic_master.__name__ = traffic_master.__qualname__ = f"traffic_master_{'parallel' if parallel else 'serial'}"
    return kernels.jit(parallel)(traffic_master)


def _make_8bit_bespoke(lr, beta, eps, parallel):
    """The plain step over 8-bit blocks, constants folded: per block, dequantise v, update,
    requantise (`.kernels.blockwise`'s codec, the same bits)."""
    omb = 1.0 - beta

    def plain_8bit(p, g, v):
        n = p.size
        blocks = (n + BLOCK8 - 1) // BLOCK8
        for t in prange((blocks + 15) // 16):
            vs = np.empty(BLOCK8, np.float32)
            for blk in range(t * 16, min(blocks, (t + 1) * 16)):
                base, at = blk * BLOCK8, blk * BLOCK8_BYTES
                stop = min(n, base + BLOCK8)
                ps, gs, vq = p[base:stop], g[base:stop], v[at : at + BLOCK8_BYTES]
                scale = scale_of(vq, 0)
                for j in range(stop - base):
                    gi = gs[j]
                    vi = np.float32(beta) * (UNSIGNED8[vq[j]] * scale) + np.float32(omb) * (gi * gi)
                    vs[j] = vi
                    ps[j] = ps[j] - np.float32(lr) * (gi / (np.sqrt(vi) + np.float32(eps)))
                requantise(vs, stop - base, vq, 0, False)

    plain_8bit.__name__ = plain_8bit.__qualname__ = f"bespoke_plain_8bit_{'parallel' if parallel else 'serial'}"
    return njit(parallel=parallel, error_model="numpy", nogil=True)(plain_8bit)


def _make_8bit_traffic(parallel):
    """Loads p, g and the 8-bit blocks (codes and scales), stores p and the blocks, with no
    arithmetic: the values rotate, one `max` keeps every load live."""

    def traffic_8bit(p, g, v):
        n = p.size
        for blk in prange((n + BLOCK8 - 1) // BLOCK8):
            base, at = blk * BLOCK8, blk * BLOCK8_BYTES
            stop = min(n, base + BLOCK8)
            ps, gs, vq = p[base:stop], g[base:stop], v[at : at + BLOCK8_BYTES]
            for j in range(stop - base):
                old = vq[j]
                vq[j] = np.uint8(np.float32(ps[j]).view(np.uint32) >> np.uint32(24))
                ps[j] = max(gs[j], np.float32(old))
            for j in range(BLOCK8, BLOCK8_BYTES):
                vq[j] = vq[j] + np.uint8(1)
        return parallel

    traffic_8bit.__name__ = traffic_8bit.__qualname__ = f"traffic_8bit_{'parallel' if parallel else 'serial'}"
    return kernels.jit(parallel)(traffic_8bit)


_BUILT: dict = {}


def _built(kind, parallel, mode="bfloat16"):
    if (kind, parallel, mode) not in _BUILT:
        h = DEFAULT_HYPER
        consts = (h["learning_rate"], h["beta"], h["epsilon"], parallel)
        make = {
            ("traffic", "bfloat16"): lambda: _make_bf16_traffic(parallel),
            ("bespoke", "bfloat16"): lambda: _make_bf16_bespoke(*consts),
            ("traffic", "8bit"): lambda: _make_8bit_traffic(parallel),
            ("bespoke", "8bit"): lambda: _make_8bit_bespoke(*consts),
            ("traffic", "bf16 copy"): lambda: _make_copy_traffic(parallel),
            ("bespoke", "bf16 copy"): lambda: _make_copy_bespoke(*consts),
            ("traffic", "bf16 master"): lambda: _make_master_traffic(parallel),
            ("traffic", "f16 master"): lambda: _make_master_traffic(parallel),
            ("bespoke", "bf16 master"): lambda: _make_master_bespoke(*consts, BFLOAT16),
            ("bespoke", "f16 master"): lambda: _make_master_bespoke(*consts, FLOAT16),
        }[(kind, mode)]
        _BUILT[(kind, parallel, mode)] = make()
    return _BUILT[(kind, parallel, mode)]


def steps(n, seed=0):
    """The zero-argument steps of one size, float32, plain variant: `{(mode, what): step}`
    with `what` in fastrms / traffic / bespoke."""
    problem = Problem(n, np.float32, seed=seed)
    h = DEFAULT_HYPER
    out = {}
    for mode in ("native", "bfloat16", "8bit"):
        p, g = problem.fresh()
        opt = RMSprop(p, h["learning_rate"], h["beta"], h["epsilon"], state_storage=mode)
        out[(mode, "fastrms")] = lambda opt=opt, g=g: opt.step(g)
    p, g = problem.fresh()
    opt = RMSprop(p, h["learning_rate"], h["beta"], h["epsilon"], copy_to=_bfloat16_like(p))
    out[("bf16 copy", "fastrms")] = lambda opt=opt, g=g: opt.step(g)
    for mode in MASTERS:
        p, g = problem.fresh()
        low = _low_like(p, mode)
        opt = RMSprop(p, h["learning_rate"], h["beta"], h["epsilon"], copy_to=low)
        g = g.astype(low.dtype)
        out[(mode, "fastrms")] = lambda opt=opt, g=g: opt.step(g)
    for what in ("traffic", "bespoke"):
        out[("native", what)] = setup(what, problem)[0]
    parallel = kernels.step_bytes(n, 4, 1) >= kernels.PARALLEL_MIN_BYTES  # as the optimizer decides
    for what in ("traffic", "bespoke"):
        p, g = problem.fresh()
        v = np.zeros(n, np.uint16)
        kernel = _built(what, parallel)
        out[("bfloat16", what)] = lambda kernel=kernel, p=p, g=g, v=v: kernel(p, g, v)
        p, g = problem.fresh()
        v = np.zeros(-(-n // BLOCK8) * BLOCK8_BYTES, np.uint8)
        kernel = _built(what, parallel, "8bit")
        out[("8bit", what)] = lambda kernel=kernel, p=p, g=g, v=v: kernel(p, g, v)
        p, g = problem.fresh()
        v, c = np.zeros(n, np.float32), np.zeros(n, np.uint16)
        kernel = _built(what, parallel, "bf16 copy")
        out[("bf16 copy", what)] = lambda kernel=kernel, p=p, g=g, v=v, c=c: kernel(p, g, v, c)
        for mode in MASTERS:
            p, g = problem.fresh()
            g = g.astype(_low_like(p, mode).dtype).view(np.uint16)
            v, c = np.zeros(n, np.float32), np.zeros(n, np.uint16)
            kernel = _built(what, parallel, mode)
            out[(mode, what)] = lambda kernel=kernel, p=p, g=g, v=v, c=c: kernel(p, g, v, c)
    peer = bitsandbytes_step(problem)
    if peer is not None:
        out[("8bit", "bitsandbytes")] = peer
    return out


def bitsandbytes_step(problem):
    """bitsandbytes' `RMSprop8bit` (blockwise 8-bit state) stepping float32 CPU tensors of
    `problem`'s size with the bench's hyperparameters, as a zero-argument step; None when
    torch or bitsandbytes is not installed or has no CPU 8-bit optimizer."""
    try:
        import bitsandbytes
        import torch
    except Exception:  # not installed, or a build that does not import here
        return None
    p, g = problem.fresh()
    h = DEFAULT_HYPER
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    opt = bitsandbytes.optim.RMSprop8bit([param], lr=h["learning_rate"], alpha=h["beta"], eps=h["epsilon"])
    try:
        opt.step()
    except Exception:  # no CPU kernels in this build
        return None
    return opt.step


def bespoke_8bit(p, g, v):
    """One step of the 8-bit-state bespoke loop (float32 `p`, `g`; uint8 blocks `v`)."""
    kernel = _built("bespoke", kernels.step_bytes(p.size, 4, 1) >= kernels.PARALLEL_MIN_BYTES, "8bit")
    kernel(p, g, v)


def _bfloat16_like(p):
    import ml_dtypes

    return np.zeros(p.shape, ml_dtypes.bfloat16)


def _low_like(p, mode):
    """Zeros like `p` in the 16-bit dtype of master mode `mode`."""
    return _bfloat16_like(p) if MASTERS[mode] is BFLOAT16 else np.zeros(p.shape, np.float16)


def bespoke_bf16(p, g, v):
    """One step of the bfloat16-state bespoke loop (float32 `p`, `g`; uint16 `v`), for tests."""
    kernel = _built("bespoke", kernels.step_bytes(p.size, 4, 1) >= kernels.PARALLEL_MIN_BYTES)
    kernel(p, g, v)


def bespoke_copy(p, g, v, c):
    """One step of the master-with-copy bespoke loop (float32 `p`, `g`, `v`; uint16 `c`)."""
    kernel = _built("bespoke", kernels.step_bytes(p.size, 4, 1) >= kernels.PARALLEL_MIN_BYTES, "bf16 copy")
    kernel(p, g, v, c)


def bespoke_master(p, g, v, c, mode):
    """One step of a 16-bit model's master bespoke loop (float32 `p`, `v`; uint16 bits `g`, `c`)."""
    kernel = _built("bespoke", kernels.step_bytes(p.size, 4, 1) >= kernels.PARALLEL_MIN_BYTES, mode)
    kernel(p, g, v, c)


def measure(sizes=(1_000_000, 10_000_000), rounds=7, target=0.05):
    """Median seconds per step of each mode and kernel at each size, interleaved: a list of
    rows `{"n", "seconds": {(mode, what): s}}`."""
    rows = []
    for n in sizes:
        rows.append({"n": n, "seconds": measure_calls(steps(n), rounds=rounds, target=target)})
    return rows


def summarize(row):
    """Per mode: us/step, GB/s, % of its limit, and its time over the native step's."""
    s, n = row["seconds"], row["n"]
    out = {}
    for mode, (moved, kept) in MODES.items():
        t = s[(mode, "fastrms")]
        limit = max(s[(mode, "traffic")], s[(mode, "bespoke")])
        out[mode] = {
            "us": t * 1e6,
            "gb_per_s": moved * n / t / 1e9,
            "pct_of_limit": 100.0 * limit / t,
            "x_native": t / s[("native", "fastrms")],
            "bytes_per_param_step": moved,
            "state_bytes_per_param": kept,
        }
    if ("8bit", "bitsandbytes") in s:
        out["8bit"]["x_bitsandbytes"] = s[("8bit", "bitsandbytes")] / s[("8bit", "fastrms")]
    return out
