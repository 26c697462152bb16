"""Pure-NumPy RMSprop, written straight from the formulas, for tests and benchmarks.

Nothing here is fast: every line allocates temporaries, as the seed article's code does.
`seed_rmsprop` and `seed_step` are the seed's own code; `rmsprop_step` and
`RMSprop` are every variant of the update exactly as [docs/algorithm.md](algorithm.md) states it, with
scalars rounded once to the array's dtype (`1 - beta` and `lr * wd` formed in float64
first), as the kernels do.
"""

import math

import numpy as np

from .core.options import resolve

#: The sum of squares' order ([docs/algorithm.md](algorithm.md), `fastrms.kernels.reduce`): blocks of
#: 32768 elements from each array's start, 1024 float64 lanes per block.
BLOCK, LANES = 1 << 15, 1024


def seed_step(theta, v, g_t, learning_rate, beta, epsilon):
    """One step of the seed article's loop body; returns the new `(theta, v)`."""
    v = beta * v + (1 - beta) * np.power(g_t, 2)
    theta = theta - (learning_rate / (np.sqrt(v) + epsilon)) * g_t
    return theta, v


def seed_rmsprop(theta, num_iterations, calculate_gradient, learning_rate=0.001, beta=0.9, epsilon=1e-8):
    """The seed article's integrated `rmsprop()`, line for line (decay x0.95 every 500)."""
    v = np.zeros_like(theta)
    for t in range(1, num_iterations + 1):
        g_t = calculate_gradient(theta)
        v = beta * v + (1 - beta) * np.power(g_t, 2)
        theta = theta - (learning_rate / (np.sqrt(v) + epsilon)) * g_t
        if t % 500 == 0:
            learning_rate *= 0.95
    return theta


def bfloat16_round(x):
    """float32 values as bfloat16 bit patterns (uint16): round to nearest, ties to even; a
    NaN stays a NaN (its top bits, with the quiet bit set)."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    one, half, sixteen = np.uint64(1), np.uint64(0x7FFF), np.uint64(16)  # typed: no promotion to float
    rounded = ((u + half + ((u >> sixteen) & one)) >> sixteen).astype(np.uint16)
    quiet = ((u >> sixteen) | np.uint64(0x0040)).astype(np.uint16)
    return np.where(np.isnan(x), quiet, rounded)


def bfloat16_value(bits):
    """bfloat16 bit patterns (uint16) as the float32 values they stand for (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def blockwise8_encode(x, signed=False):
    """float32 values `x` as 8-bit blockwise state (`fastrms.kernels.storage`): uint8
    blocks of 260 bytes, each 256 codes and the block's scale (little-endian float32),
    written plainly: scale = max |x| over the block's finite x (NaN if any is NaN), p = 2^64
    if the scale is subnormal else 1, y = (x * p) * (1 / (scale * p)) (0 when scale is 0
    or NaN; an infinite x saturates to the map's end), the code of the map entry nearest y by
    `np.searchsorted` over the midpoints (`SIGNED8`: of the magnitude nearest |y| on y's
    side)."""
    from .kernels.storage import BLOCK8, SIGNED8, UNSIGNED8, midpoints

    x = np.asarray(x, np.float32).reshape(-1)
    blocks = -(-x.size // BLOCK8)
    padded = np.zeros(blocks * BLOCK8, np.float32)
    padded[: x.size] = x
    padded = padded.reshape(blocks, BLOCK8)
    magnitude = np.abs(padded)
    finite = np.where(np.isinf(magnitude), np.float32(0), magnitude)
    scale = finite.max(axis=1) if blocks else np.zeros(0, np.float32)
    scale = np.where(np.isnan(padded).any(axis=1), np.float32(np.nan), scale).astype(np.float32)
    pre = np.where(scale < np.finfo(np.float32).tiny, np.float32(2.0**64), np.float32(1)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(scale > 0, np.float32(1) / (scale * pre), np.float32(0)).astype(np.float32)
        y = ((padded * pre[:, None]).astype(np.float32) * inv[:, None]).astype(np.float32)
    if signed:
        k = np.searchsorted(midpoints(SIGNED8[128:]), np.abs(y))
        codes = np.where(y < 0, 127 - k, 128 + k)
    else:
        codes = np.searchsorted(midpoints(UNSIGNED8), y)
    out = np.zeros((blocks, BLOCK8 + 4), np.uint8)
    out[:, :BLOCK8] = codes
    out[:, BLOCK8:] = scale.astype("<f4").view(np.uint8).reshape(blocks, 4)
    return out.reshape(-1)


def blockwise8_decode(stored, n, signed=False):
    """The `n` float32 values 8-bit blockwise state `stored` holds: `MAP[code] * scale`."""
    from .kernels.storage import BLOCK8, SIGNED8, UNSIGNED8

    blocks = np.asarray(stored, np.uint8).reshape(-1, BLOCK8 + 4)
    scale = np.ascontiguousarray(blocks[:, BLOCK8:]).view("<f4").astype(np.float32)
    values = (SIGNED8 if signed else UNSIGNED8)[blocks[:, :BLOCK8]] * scale
    return values.reshape(-1)[:n].astype(np.float32)


def mix32(h):
    """murmur3's 32-bit finaliser on uint32 values (NumPy)."""
    h = np.asarray(h, np.uint32).copy()
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def stochastic_key(seed, ident, step):
    """The noise key of array `ident` at step `step` (1-based) under `seed`:
    `mix32(mix32(seed32 ^ mix32(ident)) ^ step)`, `seed32` the seed's 32-bit halves xored."""
    seed32 = np.uint32((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    inner = mix32(np.uint32(seed32) ^ mix32(np.uint32(ident & 0xFFFFFFFF)))
    return int(mix32(inner ^ np.uint32(step & 0xFFFFFFFF)))


def bfloat16_stochastic_round(x, key, offset=0):
    """float32 values (flat) as bfloat16 bit patterns rounded stochastically: element `i`
    adds the low 16 bits of `mix32((offset + i) * 0x9E3779B9 ^ key)` to its float32 bits
    and keeps the top 16 (up with probability the dropped bits / 2^16); a NaN stays a NaN."""
    x = np.asarray(x, np.float32).reshape(-1)
    index = (np.arange(x.size, dtype=np.uint64) + np.uint64(offset)).astype(np.uint32)
    noise = mix32((index * np.uint32(0x9E3779B9)) ^ np.uint32(key))
    u = x.view(np.uint32)
    rounded = ((u + (noise & np.uint32(0xFFFF))) >> np.uint32(16)).astype(np.uint16)
    quiet = ((u >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(x), quiet, rounded)


def float16_round(x):
    """float32 values as IEEE float16 bit patterns (uint16), NumPy's own conversion: round to
    nearest, ties to even, inf from 65520 up (a NaN stays a NaN; NumPy keeps its payload
    without setting the quiet bit, which the kernels set)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).view(np.uint16)


def widened(grad, dtype):
    """A 16-bit float grad (`ml_dtypes.bfloat16` or float16) of a float32 param as the float32
    values it holds (exact); any other grad as it is."""
    grad = np.asarray(grad)
    if grad.dtype != dtype and grad.dtype.itemsize == 2 and np.dtype(dtype) == np.float32:
        return grad.astype(np.float32)
    return grad


def low_round(x, dtype):
    """float32 values rounded to the 16-bit `dtype` (bfloat16 or float16, or its name), as its
    bit patterns."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return bfloat16_round(x) if name == "bfloat16" else float16_round(x)


def global_norm(grads):
    """The 2-norm over every element of `grads`, summed in float64 in the kernels' fixed
    order (so bit for bit what the optimizer computes): for each array, blocks of `BLOCK`
    elements; in a block, element `j` of each row of `LANES` goes to lane `j` in order,
    then the lanes fold in halves; block sums are added in order from 0.0, per dtype (in the
    order the dtypes first appear), and the dtypes' sums after. Finite float64 grads whose
    squares overflow are scaled by their largest magnitude first."""
    grads = [np.asarray(g) for g in grads]
    total = 0.0
    for dtype in dict.fromkeys(g.dtype for g in grads):
        group = 0.0
        for g in (g.reshape(-1) for g in grads if g.dtype == dtype):
            for start in range(0, g.size, BLOCK):
                x = g[start : start + BLOCK].astype(np.float64)
                with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are results here
                    rows = np.concatenate([x * x, np.zeros(-x.size % LANES)]).reshape(-1, LANES)
                    lanes = np.cumsum(rows, axis=0)[-1]  # row after row: no reassociation
                while lanes.size > 1:
                    half = lanes.size // 2
                    lanes = lanes[:half] + lanes[half:]
                group += float(lanes[0])
        total += group
    if math.isinf(total) and all(np.isfinite(g).all() for g in grads):
        scale = max(float(np.max(np.abs(g))) for g in grads if g.size)
        return scale * math.sqrt(sum(float(np.sum(np.square(g / scale, dtype=np.float64))) for g in grads))
    return math.sqrt(total)


def clip_grads(grads, clip_global_norm=None, clip_value=None):
    """`(clipped grads, norm)`: `clip_value` clamps each element to `[-c, c]` (a NaN
    stays NaN); `clip_global_norm` multiplies every grad by `min(1, max_norm / (norm +
    1e-6))` (`torch.nn.utils.clip_grad_norm_`; NaN when the norm is), the coefficient
    rounded once to each grad's dtype. `norm` is `global_norm` (None without it); for
    finite grads whose norm is beyond float64's range it is inf, and `max_norm / norm` is
    taken from the grads scaled by their largest magnitude (finite, > 0)."""
    grads = [np.asarray(g) for g in grads]
    if clip_value is not None:
        grads = [np.clip(g, -g.dtype.type(clip_value), g.dtype.type(clip_value)) for g in grads]
    if clip_global_norm is None:
        return grads, None
    norm = global_norm(grads)
    coef = math.nan if math.isnan(norm) else min(1.0, clip_global_norm / (norm + 1e-6))
    if math.isinf(norm) and all(np.isfinite(g).all() for g in grads):  # the norm is beyond float64:
        scale = max(float(np.max(np.abs(g))) for g in grads if g.size)  # max_norm / norm, from scaled grads
        coef = min(1.0, (clip_global_norm / scale) / math.sqrt(sum(float(np.sum(np.square(g / scale))) for g in grads)))
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in torch
        return [g * g.dtype.type(coef) for g in grads], norm


def rmsprop_step(param, grad, state, t, lr, beta=0.9, epsilon=1e-8, **options):
    """Step `t` (1-based) of any variant; returns the new param, updates `state` (a dict
    with `square_avg` and, when used, `grad_avg` / `momentum_buffer`). `options` are
    `fastrms.RMSprop`'s keyword options (`fastrms.core.options.OPTIONS`); the formula
    is [docs/algorithm.md](algorithm.md)'s."""
    o = resolve({**options, "learning_rate": lr, "beta": beta, "epsilon": epsilon}, "rmsprop_step()")
    momentum, centered, nesterov = o["momentum"], o["centered"], o["nesterov"]
    lr_in_momentum, weight_decay, decoupled_weight_decay = (
        o["lr_in_momentum"],
        o["weight_decay"],
        o["decoupled_weight_decay"],
    )
    maximize, bias_correction, eps_in_sqrt = o["maximize"], o["bias_correction"], o["eps_in_sqrt"]
    T = param.dtype.type
    lr_t, beta_t, omb = T(lr), T(beta), T(1.0 - beta)
    p = param.copy()
    grad = widened(grad, param.dtype)  # a bfloat16 or float16 grad: its float32 values
    (grad,), _ = clip_grads([grad], o["clip_global_norm"], o["clip_value"])  # by this grad's own norm
    g = -grad if maximize else grad.copy()
    if weight_decay and not decoupled_weight_decay:
        g = g + T(weight_decay) * p
    if weight_decay and decoupled_weight_decay:
        p = p - T(lr * weight_decay) * p
    if o["state_layout"] == "rowwise":  # one v a row: the mean of the row's g^2, summed in 8 lanes
        width = int(np.prod(g.shape[1:])) if g.ndim else 1  # a 1-D param's rows are its elements
        rows = g.reshape(g.shape[0] if g.ndim else 1, width)
        padded = np.zeros((rows.shape[0], -(-width // 8) * 8), T)  # 8 lanes, lane j % 8 summing in order
        padded[:, :width] = rows * rows
        lanes8 = padded.reshape(rows.shape[0], padded.shape[1] // 8, 8)
        lanes = np.cumsum(lanes8, axis=1, dtype=T)[:, -1, :] if width else padded[:, :8]
        l0, l1, l2, l3, l4, l5, l6, l7 = (lanes[:, i] if width else np.zeros(rows.shape[0], T) for i in range(8))
        total = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
        kept = state["square_avg"].reshape(-1)
        v_row = beta_t * kept + omb * (total / T(width)) if width else kept  # a row of no elements: kept
        state["square_avg"] = v_row.reshape(state["square_avg"].shape)
        v = np.repeat(v_row, width).reshape(g.shape)
    else:
        v = beta_t * state["square_avg"] + omb * (g * g)
        state["square_avg"] = v
    bc = T(1.0 - beta**t) if bias_correction else T(1.0)
    v_hat = v / bc
    if centered:
        m = beta_t * state["grad_avg"] + omb * g
        state["grad_avg"] = m
        m_hat = m / bc
        s = np.maximum(v_hat - m_hat * m_hat, T(0.0))
    else:
        s = v_hat
    d = np.sqrt(s + T(epsilon)) if eps_in_sqrt else np.sqrt(s) + T(epsilon)
    u = g / d
    mu = T(momentum)
    if not momentum:
        return p - lr_t * u
    if lr_in_momentum:
        b = mu * state["momentum_buffer"] + lr_t * u
        state["momentum_buffer"] = b
        return p - (lr_t * u + mu * b if nesterov else b)
    b = mu * state["momentum_buffer"] + u
    state["momentum_buffer"] = b
    return p - lr_t * (u + mu * b if nesterov else b)


class RMSprop:
    """The optimizer's semantics in NumPy: same constructor and `step` as
    `fastrms.RMSprop`, no validation, params updated in place. With
    `skip_nonfinite`, a step whose grads hold a NaN or an infinity is counted in
    `skipped_steps` and changes nothing else. `clip_global_norm` clips by the norm over
    all grads (`clip_grads`), kept in `last_grad_norm`. `state_storage="bfloat16"`
    (float32 params): the step computes from the state's float32 value and uses its
    unrounded result for the param, and the state keeps that result rounded to bfloat16
    (`bfloat16_round`); `state_storage="8bit"` likewise keeps it in 8-bit blocks, each
    array's values dequantised from `blockwise8_encode`. `copy_to` (bfloat16 or float16 arrays like the float32 params):
    after each step taken, each copy holds its param rounded to its dtype (`low_round`).
    Grads of float32 params may be bfloat16 or float16: the step reads their float32 values
    (`widened`)."""

    def __init__(
        self,
        params,
        learning_rate=0.001,
        beta=0.9,
        epsilon=1e-8,
        *,
        initial_scale=0.0,
        skip_nonfinite=False,
        clip_global_norm=None,
        state_storage="native",
        copy_to=None,
        **options,
    ):
        resolve(options, "reference.RMSprop()")  # unknown names are refused here too
        self.state_storage = state_storage
        self.copies = None if copy_to is None else ([copy_to] if isinstance(copy_to, np.ndarray) else list(copy_to))
        self.skip_nonfinite, self.skipped_steps = skip_nonfinite, 0
        self.clip_global_norm, self.last_grad_norm = clip_global_norm, None
        self.single = isinstance(params, np.ndarray)
        self.params = [params] if self.single else list(params)
        self.learning_rate, self.beta, self.epsilon = learning_rate, beta, epsilon
        self.options = options
        self.step_count = 0
        self.state = []
        for p in self.params:
            rowwise = options.get("state_layout") == "rowwise"  # one square_avg value a row
            st = {"square_avg": np.full(p.shape[:1] if rowwise else p.shape, initial_scale, p.dtype)}
            if options.get("centered"):
                st["grad_avg"] = np.zeros_like(p)
            if options.get("momentum"):
                st["momentum_buffer"] = np.zeros_like(p)
            self.state.append(self._stored(st))

    def step(self, grads):
        grads = [grads] if self.single else list(grads)
        grads = [widened(g, p.dtype) for g, p in zip(grads, self.params)]
        if self.clip_global_norm is not None:
            grads, self.last_grad_norm = clip_grads(grads, self.clip_global_norm)
        if self.skip_nonfinite and not all(np.isfinite(g).all() for g in grads):
            self.skipped_steps += 1
            return
        lr = self.learning_rate
        lr = float(lr(self.step_count)) if callable(lr) else lr
        self.step_count += 1
        for p, g, st in zip(self.params, grads, self.state):
            p[...] = rmsprop_step(p, g, st, self.step_count, lr, self.beta, self.epsilon, **self.options)
            st.update(self._stored(st))
        for p, c in zip(self.params, self.copies or ()):
            c.view(np.uint16)[...] = low_round(p, c.dtype)  # copy_to: the updated params, rounded to the copy's dtype

    def _stored(self, state):
        """The state as its storage keeps it (its float values)."""
        if self.state_storage == "native":
            return state
        if self.state_storage == "8bit":  # each array in blocks of 256, dequantised
            signed = {k: k != "square_avg" for k in state}
            return {
                k: blockwise8_decode(blockwise8_encode(v, signed[k]), v.size, signed[k]).reshape(v.shape)
                for k, v in state.items()
            }
        return {k: bfloat16_value(bfloat16_round(v)) for k, v in state.items()}
