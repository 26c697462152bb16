"""The per-element RMSprop update, written once, one compiled specialisation per variant.

For step `t`, per element ([docs/algorithm.md](algorithm.md) is the contract):

    g <- grad_scale * clamp(grad, -clip, clip)    clip = inf unless clip_value is set;
                                                  grad_scale = -1 maximizing, times the
                                                  global-norm coefficient when clipping
    coupled weight decay:     g <- g + wd * p
    decoupled weight decay:   p <- p - (lr * wd) * p
    v <- beta * v + (1 - beta) * g^2
    centered:                 m <- beta * m + (1 - beta) * g
    v^ = v / bc,  m^ = m / bc                     bc = 1 - beta^t, or 1 without bias correction
    s  = max(v^ - m^^2, 0) if centered else v^
    d  = sqrt(s + eps_in) + eps_out               one of eps_in / eps_out is 0
    u  = g / d
    no momentum:              p <- p - lr * u
    momentum, lr outside:     b <- mu * b + u;       p <- p - lr * (u + mu * b if nesterov else b)
    momentum, lr inside:      b <- mu * b + lr * u;  p <- p - (lr * u + mu * b if nesterov else b)

The options that change which arrays are touched (centring, the momentum mode, Nesterov,
the weight-decay mode) are compile-time constants of each specialisation, so a variant pays
only for what it uses. `grad_scale`, `clip`, `eps_in`/`eps_out` and `bc` are runtime
scalars: their neutral values (1, inf, 0, 1) leave the arithmetic bit-exact (the clamp is two
compares, so a NaN passes through it, as `np.clip` lets it), and `bc == 1` skips the
division through a loop-invariant branch that LLVM hoists out of the loop.

Rowwise state (`element(key, rowwise=True)`, one `v` per row of a table, FBGEMM's rowwise
optimizers): the row's `v <- beta * v + (1 - beta) * mean(g^2)` is formed first, over the
row's grads as `grad_of` makes them (clipped, scaled, coupled decay), summed in order and
divided by the width; the element function then takes that `v` as given and skips its own
average of `g^2` (the rest of the update is the same lines).

`element` returns an `inline="always"` function `(p, g, v, m, b, k) -> (p, v, m, b)`:
loop shells (`.dense` and those to come) read the arrays, call it and write back what
the variant keeps. `k` is `constants`' tuple, already rounded to the arrays' dtype.
"""

import math
from typing import NamedTuple

from numba import njit

from ._jit import name
from .storage import NATIVE, suffix

#: Weight-decay modes (compile-time).
WD_NONE, WD_COUPLED, WD_DECOUPLED = 0, 1, 2
#: Momentum modes (compile-time): none, PyTorch's (lr outside the buffer), Keras/TF1/optax's
#: (lr inside the buffer).
MOM_NONE, MOM_OUTSIDE, MOM_INSIDE = 0, 1, 2


class Variant(NamedTuple):
    """The compile-time options of one kernel variant."""

    centered: bool = False
    wd_mode: int = WD_NONE
    mom_mode: int = MOM_NONE
    nesterov: bool = False

    @property
    def tag(self):
        """A name of its own for the variant's compiled functions (`c1_w2_m1_n0`)."""
        return f"c{self.centered:d}_w{self.wd_mode:d}_m{self.mom_mode:d}_n{self.nesterov:d}"

    @property
    def uses_grad_avg(self):
        return self.centered

    @property
    def uses_momentum_buffer(self):
        return self.mom_mode != MOM_NONE


def variant(centered=False, wd_mode=WD_NONE, mom_mode=MOM_NONE, nesterov=False):
    """A checked `Variant`."""
    key = Variant(bool(centered), int(wd_mode), int(mom_mode), bool(nesterov))
    if key.mom_mode not in (MOM_NONE, MOM_OUTSIDE, MOM_INSIDE) or key.wd_mode not in (
        WD_NONE,
        WD_COUPLED,
        WD_DECOUPLED,
    ):
        raise ValueError(f"unknown kernel variant {tuple(key)}")
    if key.nesterov and key.mom_mode == MOM_NONE:
        raise ValueError("nesterov needs a momentum mode")
    return key


def variants():
    """Every valid `Variant`, in a fixed order."""
    return [
        Variant(c, wd, mom, nest)
        for c in (False, True)
        for mom, nest in (
            (MOM_NONE, False),
            (MOM_OUTSIDE, False),
            (MOM_OUTSIDE, True),
            (MOM_INSIDE, False),
            (MOM_INSIDE, True),
        )
        for wd in (WD_NONE, WD_COUPLED, WD_DECOUPLED)
    ]


class Scalars(NamedTuple):
    """The runtime scalars of one step, as Python floats (float64); the kernels round each
    once to the arrays' dtype (`1 - beta` and `lr * weight_decay` are formed in float64
    first). Every shell takes them first, as one tuple: `shell(tuple(scalars), *arrays)`. Numba
    types a plain tuple of nine floats as fast as nine floats, this NamedTuple 2.4x slower
    ([docs/internals.md](internals.md) has the measurement), so the front ends pass
    `tuple(scalars)` (a `Scalars` works too, typed and compiled once more)."""

    lr: float
    beta: float
    eps_in: float
    eps_out: float
    weight_decay: float
    momentum: float
    grad_scale: float
    bias_correction: float
    clip: float = float("inf")


@njit(inline="always")
def constants(T, scalars):
    """The `Scalars` (any tuple of its nine floats) as the element function uses them, each
    rounded once to dtype `T`: `(lr, beta, 1 - beta, eps_in, eps_out, wd, lr * wd, mu,
    grad_scale, bc, bc != 1, 0, clip, -clip)`."""
    lr, beta, eps_in, eps_out, weight_decay, momentum, grad_scale, bias_correction, clip = scalars
    bc = T(bias_correction)
    return (
        T(lr),
        T(beta),
        T(1.0 - beta),
        T(eps_in),
        T(eps_out),
        T(weight_decay),
        T(lr * weight_decay),
        T(momentum),
        T(grad_scale),
        bc,
        bc != T(1.0),
        T(0.0),
        T(clip),
        T(-clip),
    )


_ELEMENTS: dict = {}
_APPLY: dict = {}


_GRADS: dict = {}


def grad_of(key):
    """The `inline="always"` `(p, g, k) -> g` of variant `key`: the grad as the update
    uses it (clipped to `[lo, hi]`, times `grad_scale`, plus `wd * p` with coupled decay)."""
    fn = _GRADS.get(key.wd_mode)
    if fn is None:
        wd_mode = key.wd_mode

        def effective(p, g, k):
            wd, grad_scale, hi, lo = k[5], k[8], k[12], k[13]
            g = hi if g > hi else (lo if g < lo else g)  # clip_value (hi = inf: unchanged, NaN too)
            g = grad_scale * g
            if wd_mode == WD_COUPLED:
                g = g + wd * p
            return g

        name(effective, f"grad_of_w{wd_mode:d}")
        fn = _GRADS[key.wd_mode] = njit(inline="always")(effective)
    return fn


def element(key, rowwise=False):
    """The `inline="always"` per-element update of variant `key` (a `Variant`); with
    `rowwise`, `v` is the row's, already averaged (see the module)."""
    fn = _ELEMENTS.get((key, rowwise))
    if fn is None:
        fn = _ELEMENTS[(key, rowwise)] = _make_element(key, rowwise)
    return fn


def _make_element(key, rowwise):
    centered, wd_mode, mom_mode, nesterov = key
    effective = grad_of(key)

    def update(p, g, v, m, b, k):
        lr, beta, one_minus_beta, eps_in, eps_out, wd, lr_wd, mu, grad_scale, bc, correct, zero, hi, lo = k
        g = effective(p, g, k)
        if wd_mode == WD_DECOUPLED:
            p = p - lr_wd * p
        if not rowwise:
            v = beta * v + one_minus_beta * (g * g)
        if centered:
            m = beta * m + one_minus_beta * g
            mhat = m / bc if correct else m
            s = (v / bc if correct else v) - mhat * mhat
            s = zero if s < zero else s  # max(s, 0); NaN passes through, as np.maximum does
        else:
            s = v / bc if correct else v
        u = g / (math.sqrt(s + eps_in) + eps_out)
        if mom_mode == MOM_OUTSIDE:
            b = mu * b + u
            p = p - lr * (u + mu * b) if nesterov else p - lr * b
        elif mom_mode == MOM_INSIDE:
            step = lr * u
            b = mu * b + step
            p = p - (step + mu * b) if nesterov else p - b
        else:
            p = p - lr * u
        return p, v, m, b

    name(update, f"element_{key.tag}{'_rowwise' if rowwise else ''}")
    return njit(inline="always")(update)


def apply(key, codec=NATIVE):
    """The `inline="always"` step of element `i`, shared by every loop shell:
    `apply(i, p, g, square_avg, grad_avg, momentum_buffer, k) -> (p, v, m, b)` takes the
    param's and the grad's values `p` and `g` (the shell reads them: `param[i]` and
    `grad[i]`, the grad by position in the row shells, either through a 16-bit codec),
    reads element `i` of the state arrays variant `key` uses, calls `element` and returns
    what the shell stores into element `i` (`v`, `m`, `b` as `codec` stores them,
    `fastrms.kernels.storage`; `m` / `b` are not stored by variants without them).

    The shell's loop body reads the param and the grad and does the stores: a store of a
    bfloat16 state's uint16 inside an inlined function that takes the array stopped LLVM
    vectorising the loop (6x slower), and so did a bfloat16 or float16 grad decoded inside
    it (the square root stayed a scalar `sqrtf` call, 30x slower), while the same load or
    store in the loop body vectorises."""
    fn = _APPLY.get((key, codec.tag))
    if fn is None:
        fn = _APPLY[(key, codec.tag)] = _make_apply(key, codec)
    return fn


def _make_apply(key, codec):
    update = element(key)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    load, encode = codec.load, codec.encode

    def at(i, p, g, square_avg, grad_avg, momentum_buffer, k):
        zero = k[11]
        m = load(grad_avg, i) if uses_m else zero
        b = load(momentum_buffer, i) if uses_b else zero
        p, v, m, b = update(p, g, load(square_avg, i), m, b, k)
        return p, encode(v), encode(m), encode(b)

    name(at, f"apply_{key.tag}{suffix(codec)}")
    return njit(inline="always")(at)
