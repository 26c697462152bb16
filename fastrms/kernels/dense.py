"""Loop shells over whole flat arrays: each reads the arrays a variant uses, calls the
variant's :func:`~.element.element` and writes back, once per element, in place.

``dense(key, parallel)`` is the in-place shell ``(param, grad, square_avg, grad_avg,
momentum_buffer, *scalars)`` over 1-D C-contiguous arrays of one float dtype (``grad_avg`` /
``momentum_buffer`` may be empty when the variant does not use them; ``scalars`` is a
:class:`~.element.Scalars`, passed unpacked). It checks only that the arrays it uses have ``param``'s size,
so it can never run past one; everything else is the caller's to validate. It returns
whether it ran in parallel. Callable from Python and from ``@njit`` code.
"""

from numba import prange

from ._jit import jit, name
from .element import constants, element

_DENSE = {}


def dense(key, parallel):
    """The in-place shell of variant ``key``, serial or ``parallel=True``."""
    fn = _DENSE.get((key, parallel))
    if fn is None:
        fn = _DENSE[(key, parallel)] = _make_dense(key, parallel)
    return fn


def _make_dense(key, parallel):
    update = element(key)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(param, grad, square_avg, grad_avg, momentum_buffer, lr, beta, eps_in, eps_out, wd, mu, sign, bc):
        n = param.size
        if grad.size != n or square_avg.size != n:
            raise ValueError("dense: grad and square_avg must have the size of param")
        if uses_m and grad_avg.size != n:
            raise ValueError("dense: grad_avg must have the size of param (centered variant)")
        if uses_b and momentum_buffer.size != n:
            raise ValueError("dense: momentum_buffer must have the size of param (momentum variant)")
        k = constants(param.dtype.type, lr, beta, eps_in, eps_out, wd, mu, sign, bc)
        zero = param.dtype.type(0.0)
        for i in prange(n):
            m = grad_avg[i] if uses_m else zero
            b = momentum_buffer[i] if uses_b else zero
            p, v, m, b = update(param[i], grad[i], square_avg[i], m, b, k)
            param[i] = p
            square_avg[i] = v
            if uses_m:
                grad_avg[i] = m
            if uses_b:
                momentum_buffer[i] = b
        return parallel

    name(shell, f"dense_{key.tag}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)
