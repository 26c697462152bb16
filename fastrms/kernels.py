"""The fused RMSprop kernels: Numba code and nothing else.

Each update driver reads ``param``, ``grad`` and the state arrays once and writes ``param``
and the state once, element by element, in place: no temporaries and no second pass. Beside
them: ``rmsprop_update`` (the plain step for user ``@njit`` code), ``nonfinite_*`` (the
read-only grad check behind ``skip_nonfinite``) and ``step_bytes`` (the traffic rule behind
the serial/parallel choice). This module imports nothing from the rest of the package, so
user ``@njit`` code can call it directly.

The per-element update (written once, in :func:`_make_driver`) is, for step ``t``::

    g <- sign * grad                              sign = -1 when maximizing
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

Scalars arrive as Python floats and are rounded once to the array's dtype (``1 - beta`` and
``lr * wd`` are formed in float64 first), so float32 arrays are updated in float32
arithmetic throughout. ``sign``, ``eps_in``/``eps_out`` and ``bc`` are runtime scalars
because their neutral values (1, 0, 1) leave the arithmetic bit-exact (and ``bc == 1`` skips
the division through a loop-invariant branch that LLVM hoists out of the loop); the options that
change which arrays are touched (centring, momentum, Nesterov, weight decay) are
compile-time constants of each specialised driver, so a variant pays only for what it uses.

Each variant has two drivers compiled from that one source: a serial loop and a
``parallel=True`` ``prange`` loop. Steps that move at least :data:`PARALLEL_MIN_BYTES` go to
the parallel one.
"""

import numpy as np
from numba import njit, prange

#: A step that moves at least this many bytes (param, grad and state read; param and state
#: written) runs on the parallel driver; a smaller one on the serial driver, since a parallel
#: launch costs several microseconds. Measured on 2 cores (``fastrms bench --threshold``):
#: the parallel driver starts to win between about 0.5 MiB (centered + momentum, float64)
#: and 1.3 MiB (plain, float32) of traffic.
PARALLEL_MIN_BYTES = 3 << 18


#: Weight-decay modes (compile-time).
WD_NONE, WD_COUPLED, WD_DECOUPLED = 0, 1, 2
#: Momentum modes (compile-time): none, PyTorch's (lr outside the buffer), Keras/TF1/optax's
#: (lr inside the buffer).
MOM_NONE, MOM_OUTSIDE, MOM_INSIDE = 0, 1, 2

_JIT_OPTIONS = dict(error_model="numpy", nogil=True)

#: "on" when compiled kernels are cached on disk, else why not. Caching is on by default:
#: without it every new process compiles each variant it uses again (0.15 s serial, 0.4 s
#: parallel). Numba looks for a writable place (next to this file, then the user-wide cache,
#: or NUMBA_CACHE_DIR, which fastrms never overrides); where there is none (a read-only
#: install with no writable home), the kernels are compiled in memory instead of failing.
CACHE_STATUS = "on"


def _jit(parallel=False):
    """``njit`` with this module's options, cached on disk where Numba can."""

    def wrap(fn):
        global CACHE_STATUS
        if CACHE_STATUS == "on":
            try:
                return njit(parallel=parallel, cache=True, **_JIT_OPTIONS)(fn)
            except RuntimeError as exc:  # Numba found no writable cache location
                if "cannot cache" not in str(exc):
                    raise
                CACHE_STATUS = f"off: {exc}"
        return njit(parallel=parallel, **_JIT_OPTIONS)(fn)

    return wrap


@_jit()
def step_bytes(size, itemsize, state_arrays):
    """Bytes one fused step moves: reads 2 + k arrays, writes 1 + k (k state arrays)."""
    return size * itemsize * (3 + 2 * state_arrays)


def _make_driver(centered, wd_mode, mom_mode, nesterov, parallel):
    """Compile-time specialisation of the one per-element update.

    The flags are closure constants, so Numba folds the branches away. Each variant gets a
    name of its own (``driver_c1_w2_m1_n0_parallel``): Numba derives both the cache file and
    the machine-code symbol from the function's qualified name, and variants sharing one name
    would let a cached caller (``rmsprop_update``) link against another variant's code in a
    later process.
    """

    def driver(
        param,
        grad,
        square_avg,
        grad_avg,
        momentum_buffer,
        lr,
        beta,
        eps_in,
        eps_out,
        weight_decay,
        momentum,
        sign,
        bias_correction,
    ):
        n = param.size
        if grad.size != n or square_avg.size != n:
            raise ValueError("driver: grad and square_avg must have the size of param")
        if centered and grad_avg.size != n:
            raise ValueError("driver: grad_avg must have the size of param (centered variant)")
        if mom_mode != MOM_NONE and momentum_buffer.size != n:
            raise ValueError("driver: momentum_buffer must have the size of param (momentum variant)")
        T = param.dtype.type
        zero = T(0.0)
        lr_ = T(lr)
        beta_ = T(beta)
        one_minus_beta = T(1.0 - beta)
        eps_in_ = T(eps_in)
        eps_out_ = T(eps_out)
        wd = T(weight_decay)
        lr_wd = T(lr * weight_decay)
        mu = T(momentum)
        sign_ = T(sign)
        bc = T(bias_correction)
        correct = bc != T(1.0)  # loop-invariant: LLVM unswitches it, so no division when off
        for i in prange(n):
            p = param[i]
            g = sign_ * grad[i]
            if wd_mode == WD_COUPLED:
                g = g + wd * p
            elif wd_mode == WD_DECOUPLED:
                p = p - lr_wd * p
            v = beta_ * square_avg[i] + one_minus_beta * (g * g)
            square_avg[i] = v
            if centered:
                m = beta_ * grad_avg[i] + one_minus_beta * g
                grad_avg[i] = m
                mhat = m / bc if correct else m
                s = (v / bc if correct else v) - mhat * mhat
                s = zero if s < zero else s  # NaN passes through, as np.maximum does
            else:
                s = v / bc if correct else v
            u = g / (np.sqrt(s + eps_in_) + eps_out_)
            if mom_mode == MOM_OUTSIDE:
                b = mu * momentum_buffer[i] + u
                momentum_buffer[i] = b
                if nesterov:
                    p = p - lr_ * (u + mu * b)
                else:
                    p = p - lr_ * b
            elif mom_mode == MOM_INSIDE:
                step = lr_ * u
                b = mu * momentum_buffer[i] + step
                momentum_buffer[i] = b
                if nesterov:
                    p = p - (step + mu * b)
                else:
                    p = p - b
            else:
                p = p - lr_ * u
            param[i] = p
        return parallel

    name = f"driver_c{centered:d}_w{wd_mode:d}_m{mom_mode:d}_n{nesterov:d}_{'parallel' if parallel else 'serial'}"
    driver.__name__ = driver.__qualname__ = name
    return _jit(parallel)(driver)


_DRIVERS = {}


def drivers(centered=False, wd_mode=WD_NONE, mom_mode=MOM_NONE, nesterov=False):
    """Return ``(serial, parallel)``, the two compiled drivers of one variant.

    Both take ``(param, grad, square_avg, grad_avg, momentum_buffer, lr, beta, eps_in,
    eps_out, weight_decay, momentum, sign, bias_correction)`` with 1-D C-contiguous arrays of
    one float dtype (``grad_avg`` / ``momentum_buffer`` may be empty when the variant does not
    use them), update in place and return whether they ran in parallel. They check only that
    the arrays they use have ``param``'s size (so they can never run past one); everything
    else is the caller's to validate. Callable from Python and from ``@njit`` code.
    """
    key = (bool(centered), int(wd_mode), int(mom_mode), bool(nesterov))
    if key[2] not in (MOM_NONE, MOM_OUTSIDE, MOM_INSIDE) or key[1] not in (
        WD_NONE,
        WD_COUPLED,
        WD_DECOUPLED,
    ):
        raise ValueError(f"unknown kernel variant {key}")
    if key[3] and key[2] == MOM_NONE:
        raise ValueError("nesterov needs a momentum mode")
    pair = _DRIVERS.get(key)
    if pair is None:
        pair = _DRIVERS[key] = (_make_driver(*key, False), _make_driver(*key, True))
    return pair


_plain_serial, _plain_parallel = drivers()


def _make_nonfinite(parallel):
    """Whether a float array holds a NaN or an infinity: ``x - x`` is 0 exactly when ``x`` is
    finite (no fastmath, so LLVM may not fold it), counted with an integer sum that
    vectorises. The array is only read."""

    def nonfinite(a):
        zero = a.dtype.type(0.0)
        count = 0
        for i in prange(a.size):
            x = a[i]
            count += 1 if x - x != zero else 0
        return count > 0

    nonfinite.__name__ = nonfinite.__qualname__ = f"nonfinite_{'parallel' if parallel else 'serial'}"
    return _jit(parallel)(nonfinite)


#: ``nonfinite_serial(a)`` / ``nonfinite_parallel(a)``: True if the 1-D float array ``a``
#: holds a NaN or +-Inf.
nonfinite_serial, nonfinite_parallel = _make_nonfinite(False), _make_nonfinite(True)


@_jit()
def rmsprop_update(param, grad, square_avg, learning_rate, beta, epsilon):
    """The plain RMSprop step, in place, callable from Python or from ``@njit`` code::

        v <- beta * v + (1 - beta) * g^2
        p <- p - learning_rate * g / (sqrt(v) + epsilon)

    ``param``, ``grad`` and ``square_avg`` are C-contiguous float32 or float64 arrays of one
    dtype and size (any shape); float32 stays float32. Large arrays run in parallel. Returns
    nothing. Example::

        from numba import njit
        from fastrms.kernels import rmsprop_update

        @njit
        def train(w, v, g, steps):
            for _ in range(steps):
                g[:] = 2.0 * w - 1.0          # the gradient of sum((w - 0.5)**2)
                rmsprop_update(w, g, v, 0.01, 0.9, 1e-8)
    """
    n = param.size
    if grad.size != n or square_avg.size != n:
        raise ValueError("rmsprop_update: param, grad and square_avg must have one size")
    p = param.reshape(n)
    g = grad.reshape(n)
    v = square_avg.reshape(n)
    if step_bytes(n, param.itemsize, 1) >= PARALLEL_MIN_BYTES:
        _plain_parallel(p, g, v, p[:0], p[:0], learning_rate, beta, 0.0, epsilon, 0.0, 0.0, 1.0, 1.0)
    else:
        _plain_serial(p, g, v, p[:0], p[:0], learning_rate, beta, 0.0, epsilon, 0.0, 0.0, 1.0, 1.0)
